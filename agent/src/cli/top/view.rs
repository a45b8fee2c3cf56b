//! Draws [`State`] with ratatui: a title line, the table, the detail pane,
//! the footer of keys, and the help overlay. Sized for 80x24 first: the
//! figures take 63 columns, the cgroup column gets the rest.

use std::time::Duration;

use ratatui::{
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span, Text},
    widgets::{Block, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Wrap},
    Frame,
};

use super::state::{Column, Figures, Mode, State};
use crate::{events::Record, units};

/// Width of each figure column (the cgroup column takes what is left).
fn width(column: Column) -> u16 {
    match column {
        Column::Cpu | Column::Dropped | Column::Denied => 6,
        Column::RunqP99 => 7,
        Column::Memory | Column::Rx | Column::Tx => 8,
        Column::Pids => 5,
        Column::Name => 0,
    }
}

const DASH: &str = "-";
/// Rows of the detail pane, borders included.
const DETAIL_HEIGHT: u16 = 7;

/// The text of one figure cell.
#[must_use]
pub fn cell(figures: &Figures, column: Column) -> String {
    #[expect(clippy::cast_precision_loss, reason = "display")]
    match column {
        Column::Cpu => figures
            .cpu_percent
            .map_or_else(|| DASH.into(), |p| format!("{p:.1}")),
        Column::RunqP99 => figures
            .runq_p99_ns()
            .map_or_else(|| DASH.into(), units::duration_ns),
        Column::Memory => figures
            .memory_bytes
            .map_or_else(|| DASH.into(), |b| units::bytes_short(b as f64)),
        Column::Pids => figures
            .pids
            .map_or_else(|| DASH.into(), |p| units::count(p as f64)),
        Column::Rx => figures
            .rx_bytes_per_s
            .map_or_else(|| DASH.into(), units::bytes_short),
        Column::Tx => figures
            .tx_bytes_per_s
            .map_or_else(|| DASH.into(), units::bytes_short),
        Column::Dropped => units::count(figures.dropped_packets as f64),
        Column::Denied => units::count(figures.device_denials as f64),
        Column::Name => String::new(),
    }
}

/// `text` cut to `width` characters, keeping its end (where a path says the most).
fn tail(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width || width == 0 {
        return text.to_owned();
    }
    let keep: String = text.chars().skip(count - width + 1).collect();
    format!("…{keep}")
}

fn interval_text(interval: Duration) -> String {
    let ms = interval.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", interval.as_secs_f64())
    }
}

/// Draws the whole screen; returns how many data rows the table showed
/// (the page for page up and down).
pub fn draw(frame: &mut Frame<'_>, state: &State, table: &mut TableState) -> usize {
    let detail = if state.detail { DETAIL_HEIGHT } else { 0 };
    let [title, body, pane, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(2),
        Constraint::Length(detail),
        Constraint::Length(2),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(title_line(state)), title);
    let page = draw_table(frame, state, table, body);
    if state.detail {
        draw_detail(frame, state, pane);
    }
    frame.render_widget(Paragraph::new(footer_lines(state)), footer);
    if state.mode == Mode::Help {
        draw_help(frame);
    }
    page
}

fn title_line(state: &State) -> Line<'static> {
    let time = state.timestamp.get(11..19).unwrap_or("");
    let mut spans = vec![
        Span::styled("agent top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  {time}  {} cgroups  every {}  {}",
            state.cgroups.len(),
            interval_text(state.interval),
            if state.tree { "tree" } else { "flat" },
        )),
    ];
    if !state.has_rates && !state.cgroups.is_empty() {
        spans.push(Span::styled(
            "  measuring",
            Style::new().add_modifier(Modifier::DIM),
        ));
    }
    if state.paused {
        spans.push(Span::styled(
            "  PAUSED",
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        ));
    }
    if !state.filter.is_empty() && state.mode != Mode::Filter {
        spans.push(Span::raw(format!("  filter: {}", state.filter)));
    }
    if state.uncounted_packets > 0 {
        spans.push(Span::styled(
            format!("  {} packets uncounted", state.uncounted_packets),
            Style::new().fg(Color::Red),
        ));
    }
    spans.push(Span::styled(
        format!("  {}", state.cgroup_root),
        Style::new().add_modifier(Modifier::DIM),
    ));
    Line::from(spans)
}

fn draw_table(frame: &mut Frame<'_>, state: &State, table: &mut TableState, area: Rect) -> usize {
    let fixed: u16 = Column::ALL.iter().map(|c| width(*c) + 1).sum();
    let name_width = usize::from(area.width.saturating_sub(fixed).max(8));
    let header = Row::new(Column::ALL.map(|column| {
        let mut title = column.title().to_owned();
        if column == state.sort {
            title.push(if state.reverse { '▲' } else { '▼' });
        }
        let line = Line::from(title);
        Cell::from(if column == Column::Name {
            line
        } else {
            line.right_aligned()
        })
    }))
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let rows = state.lines.iter().map(|line| {
        let cgroup = &state.cgroups[line.cgroup];
        let figures = state.figures(cgroup);
        let cells = Column::ALL.map(|column| {
            if column == Column::Name {
                let mut label = if state.tree {
                    format!("{}{}", "  ".repeat(line.depth), cgroup.leaf())
                } else {
                    cgroup.path.clone()
                };
                if let Some(name) = &cgroup.name {
                    label = format!("{label} ({name})");
                }
                return Cell::from(tail(&label, name_width));
            }
            let text = Line::from(cell(figures, column)).right_aligned();
            let alarming = match column {
                Column::Dropped => figures.dropped_packets > 0,
                Column::Denied => figures.device_denials > 0,
                _ => false,
            };
            if alarming {
                Cell::from(text).style(Style::new().fg(Color::Red))
            } else {
                Cell::from(text)
            }
        });
        Row::new(cells)
    });
    let widths = Column::ALL.map(|column| match column {
        Column::Name => Constraint::Min(8),
        other => Constraint::Length(width(other)),
    });
    let widget = Table::new(rows, widths)
        .header(header)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    table.select((!state.lines.is_empty()).then_some(state.cursor));
    frame.render_stateful_widget(widget, area, table);
    if state.lines.is_empty() {
        let note = if state.filter.is_empty() {
            "no cgroups yet"
        } else {
            "no cgroup matches the filter"
        };
        if let Some(below) = area.rows().nth(1) {
            frame.render_widget(
                Paragraph::new(note).style(Style::new().add_modifier(Modifier::DIM)),
                below,
            );
        }
    }
    usize::from(area.height.saturating_sub(1))
}

/// The last `width` points of a series, scaled to integers for the sparkline.
fn points(series: &std::collections::VecDeque<f64>, width: u16, scale: f64) -> Vec<u64> {
    let skip = series.len().saturating_sub(usize::from(width));
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "non-negative display values"
    )]
    series
        .iter()
        .skip(skip)
        .map(|v| (v * scale).max(0.0).round() as u64)
        .collect()
}

fn draw_detail(frame: &mut Frame<'_>, state: &State, area: Rect) {
    let Some(cgroup) = state.selection() else {
        frame.render_widget(Block::bordered().title(" no cgroup selected "), area);
        return;
    };
    let scope = if state.tree { "subtree" } else { "own" };
    let block = Block::bordered().title(format!(" {} ({scope}, id {}) ", cgroup.path, cgroup.id));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(inner);
    let figures = state.figures(cgroup);
    let rows = Layout::vertical([Constraint::Length(1); 5]).split(left);
    let empty = std::collections::VecDeque::new();
    let series = state.selected_series();
    let lines = [
        (
            "CPU",
            cell(figures, Column::Cpu) + "%",
            series.map_or(&empty, |s| &s.cpu_percent),
            10.0,
            Color::Green,
        ),
        (
            "RX",
            cell(figures, Column::Rx) + "/s",
            series.map_or(&empty, |s| &s.rx_bytes_per_s),
            1.0,
            Color::Cyan,
        ),
        (
            "TX",
            cell(figures, Column::Tx) + "/s",
            series.map_or(&empty, |s| &s.tx_bytes_per_s),
            1.0,
            Color::Magenta,
        ),
    ];
    for (row, (label, value, series, scale, color)) in rows.iter().zip(lines) {
        let [text, spark] =
            Layout::horizontal([Constraint::Length(16), Constraint::Min(1)]).areas(*row);
        frame.render_widget(Paragraph::new(format!("{label:<3}{value:>12}")), text);
        frame.render_widget(
            Sparkline::default()
                .data(points(series, spark.width, scale))
                .style(Style::new().fg(color)),
            spark,
        );
    }
    let info = [
        format!(
            "mem {}  pids {}  runq p99 {}",
            cell(figures, Column::Memory),
            cell(figures, Column::Pids),
            cell(figures, Column::RunqP99)
        ),
        format!(
            "dropped {}  denied {}{}",
            cell(figures, Column::Dropped),
            cell(figures, Column::Denied),
            cgroup
                .name
                .as_ref()
                .map_or_else(String::new, |n| format!("  workload {n}"))
        ),
    ];
    for (row, text) in rows.iter().skip(3).zip(info) {
        frame.render_widget(Paragraph::new(text), *row);
    }

    let events = state.selected_events(usize::from(right.height.saturating_sub(1)));
    let mut text = vec![Line::styled(
        "latest deny events",
        Style::new().add_modifier(Modifier::BOLD),
    )];
    if events.is_empty() {
        let note = state.events_note.as_deref().unwrap_or("none");
        text.push(Line::styled(
            note.to_owned(),
            Style::new().add_modifier(Modifier::DIM),
        ));
    }
    text.extend(events.into_iter().map(|r| Line::from(event_line(r))));
    frame.render_widget(
        Paragraph::new(Text::from(text)).wrap(Wrap { trim: true }),
        right,
    );
}

/// One deny event in a line: when, what, who.
#[must_use]
pub fn event_line(record: &Record) -> String {
    let time = record.time.get(11..19).unwrap_or(&record.time);
    let what = if let Some(device) = &record.device {
        format!(
            "{} {}:{} {}",
            device.dev_type, device.major, device.minor, device.access
        )
    } else if let Some(net) = &record.net {
        let port = net.dst_port.map_or_else(String::new, |p| format!(":{p}"));
        format!(
            "{} {} {}{port} {}",
            net.direction, net.protocol, net.dst, net.outcome
        )
    } else {
        record.kind.clone()
    };
    let who = match (&record.comm, record.pid) {
        (Some(comm), Some(pid)) => format!(" {comm}[{pid}]"),
        _ => String::new(),
    };
    format!("{time} {what}{who}")
}

fn footer_lines(state: &State) -> Text<'static> {
    let key = |k: &str| Span::styled(k.to_owned(), Style::new().add_modifier(Modifier::BOLD));
    if state.mode == Mode::Filter {
        return Text::from(vec![
            Line::from(vec![
                key("filter: "),
                Span::raw(format!("{}_", state.filter)),
            ]),
            Line::from(vec![
                key("enter"),
                Span::raw(" keep  "),
                key("esc"),
                Span::raw(" clear  (a substring of the cgroup's path or name)"),
            ]),
        ]);
    }
    let mut sort = vec![Span::raw("sort:")];
    for column in Column::ALL {
        sort.push(Span::raw(" "));
        let title = column.title().trim_end_matches("/s");
        sort.push(Span::styled(
            column.key().to_string(),
            Style::new()
                .add_modifier(Modifier::BOLD)
                .fg(if column == state.sort {
                    Color::Yellow
                } else {
                    Color::Reset
                }),
        ));
        sort.push(Span::raw(format!(" {} ", title.to_lowercase())));
    }
    let mut keys = Vec::new();
    for (k, what) in [
        ("q", "quit"),
        ("?", "help"),
        ("/", "filter"),
        ("t", "tree"),
        ("space", "pause"),
        ("+/-", "refresh"),
        ("enter", "detail"),
    ] {
        keys.push(key(k));
        keys.push(Span::raw(format!(" {what}  ")));
    }
    Text::from(vec![Line::from(sort), Line::from(keys)])
}

/// At most 76 columns a line, so that it fits 80 with its border.
const HELP: &str = "\
↑ ↓ j k PgUp PgDn Home End  move the selection (it stays on its cgroup)
c l m p r s x e n  sort by CPU%, RUNQ99, MEM, PIDS, RX/s, TX/s, DROP, DENY,
                   CGROUP; the same key again (or i) reverses; < > step
t      tree: parents roll up their children's CPU, traffic, waits, drops
       and denials (MEM and PIDS are the kernel's, already hierarchical)
/      filter by a substring of the path (enter keeps it, esc clears it)
space  pause              + -  longer / shorter refresh interval
enter  detail pane: recent history and the latest deny events
q      quit (also Ctrl-C); any other key closes this help

CPU%: of one CPU over the interval. RUNQ99: 99th percentile of the
run-queue waits that ended in it. DROP: packets the network policy
dropped. DENY: device accesses denied. -: the host cannot give it.";

fn draw_help(frame: &mut Frame<'_>) {
    let area = frame.area();
    let width = area.width.min(80);
    let height = area
        .height
        .min(u16::try_from(HELP.lines().count() + 2).unwrap_or(u16::MAX));
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(HELP)
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(" agent top: keys ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use ratatui::{backend::TestBackend, Terminal};

    use super::*;

    fn screen(state: &State, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        let mut table = TableState::default();
        terminal
            .draw(|f| {
                let _ = draw(f, state, &mut table);
            })
            .unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect()
    }

    fn figures() -> Figures {
        let mut runq = [0u64; common::LATENCY_BUCKETS];
        runq[3] = 100;
        Figures {
            cpu_percent: Some(45.25),
            runq_buckets: Some(runq),
            memory_bytes: Some(3 << 20),
            pids: None,
            rx_bytes_per_s: Some(1536.0),
            tx_bytes_per_s: Some(0.0),
            dropped_packets: 1500,
            device_denials: 2,
        }
    }

    #[test]
    fn cells_use_human_units_and_a_dash_for_what_is_missing() {
        let f = figures();
        let cells: Vec<String> = Column::ALL.iter().map(|c| cell(&f, *c)).collect();
        assert_eq!(
            cells,
            ["45.2", "16µs", "3.0 MiB", "-", "1.5 KiB", "0 B", "1.5k", "2", ""]
        );
        for column in Column::ALL {
            assert!(cell(&f, column).chars().count() <= usize::from(width(column).max(1)));
        }
        assert_eq!(tail("/a/long/path", 6), "…/path");
        assert_eq!(interval_text(Duration::from_millis(250)), "250ms");
        assert_eq!(interval_text(Duration::from_millis(1500)), "1.5s");
        assert_eq!(interval_text(Duration::from_secs(2)), "2s");
    }

    fn busy_state() -> State {
        let mut state = State::new(Duration::from_secs(1));
        state.cgroups = (0..30)
            .map(|i| super::super::state::Cgroup {
                id: i,
                path: if i == 0 {
                    "/".into()
                } else {
                    format!("/system.slice/a-rather-long-unit-name-{i}.service")
                },
                name: None,
                parent: (i > 0).then_some(0),
                depth: usize::from(i > 0),
                own: figures(),
                subtree: figures(),
            })
            .collect();
        state.timestamp = "2026-11-30T12:00:01.000Z".into();
        state.cgroup_root = "/sys/fs/cgroup".into();
        state.has_rates = true;
        state.relayout();
        state
    }

    #[test]
    fn an_80x24_terminal_shows_every_column_and_the_keys() {
        let mut state = busy_state();
        let lines = screen(&state, 80, 24);
        assert!(
            lines[0].starts_with("agent top  12:00:01  30 cgroups  every 1s  flat"),
            "{lines:#?}"
        );
        assert_eq!(
            lines[1].trim_end(),
            " CPU%▼  RUNQ99      MEM  PIDS     RX/s     TX/s   DROP   DENY CGROUP"
        );
        assert_eq!(
            lines[2].trim_end(),
            "  45.2    16µs  3.0 MiB     -  1.5 KiB      0 B   1.5k      2 /"
        );
        assert!(
            lines[3].ends_with(" …t-name-1.service "),
            "long paths keep their end: {lines:#?}"
        );
        assert!(lines[22].starts_with(
            "sort: c cpu%  l runq99  m mem  p pids  r rx  s tx  x drop  e deny  n cgroup"
        ));
        assert!(lines[23].starts_with("q quit  ? help  / filter  t tree  space pause"));
        assert!(lines.iter().all(|l| l.chars().count() == 80));

        state.detail = true;
        let history = state.history.entry(0).or_default();
        history.own.cpu_percent.extend([0.0, 50.0, 100.0]);
        let lines = screen(&state, 80, 24);
        assert!(lines[15].starts_with("┌ / (own, id 0) "), "{lines:#?}");
        assert!(lines[16].starts_with("│CPU       45.2%  ▄█ "), "{lines:#?}");
        assert!(lines[16].contains("latest deny events"), "{lines:#?}");
        assert!(lines[17].contains("none"), "{lines:#?}");
        assert!(lines[19].starts_with("│mem 3.0 MiB  pids -  runq p99 16µs"));

        state.handle(super::super::state::Key::Char('?'));
        let lines = screen(&state, 80, 24);
        assert!(lines.iter().any(|l| l.contains("agent top: keys")));
        assert!(lines
            .iter()
            .any(|l| l.contains("│q      quit (also Ctrl-C); any other key closes this help")));
        assert!(lines
            .iter()
            .any(|l| l.contains("DENY: device accesses denied.")));
        assert!(HELP.lines().all(|l| l.chars().count() <= 76));
    }

    #[test]
    fn before_the_first_rates_the_title_says_so() {
        let mut state = busy_state();
        state.has_rates = false;
        assert!(screen(&state, 80, 24)[0].starts_with(
            "agent top  12:00:01  30 cgroups  every 1s  flat  measuring  /sys/fs/cgroup"
        ));
    }

    #[test]
    fn the_tree_indents_children_and_the_filter_shows_while_typing() {
        let mut state = busy_state();
        state.tree = true;
        state.relayout();
        let lines = screen(&state, 100, 10);
        assert!(lines[2]
            .starts_with("  45.2    16µs  3.0 MiB     -  1.5 KiB      0 B   1.5k      2 /  "));
        assert!(lines[3].contains("      2   a-rather-long-unit-name-1.service  "));
        state.handle(super::super::state::Key::Char('/'));
        state.handle(super::super::state::Key::Char('7'));
        let lines = screen(&state, 100, 10);
        assert!(lines[8].starts_with("filter: 7_"), "{lines:#?}");
    }
}
