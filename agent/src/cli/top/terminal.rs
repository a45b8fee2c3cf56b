//! The terminal while `agent top` draws on it: raw mode and the alternate
//! screen, undone on every way out. A drop guard restores it on return and
//! while a panic unwinds; the panic hook restores it before the message is
//! printed (so the message lands on the normal screen); SIGTERM, SIGINT and
//! SIGHUP only set a flag that the main loop checks at least every 100 ms,
//! so it leaves through the guard too. Ctrl-C in raw mode is a key, not a
//! signal, and quits like `q`.

use std::{
    io::{self, IsTerminal as _, Stdout},
    sync::{
        atomic::{AtomicBool, Ordering},
        Once,
    },
};

use crossterm::{
    cursor::{Hide, Show},
    execute,
    terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen},
};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use ratatui::{backend::CrosstermBackend, Terminal};

/// Set by a signal that asks `agent top` to end.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Whether SIGTERM, SIGINT or SIGHUP arrived.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// What the terminal's input has after a wait.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Something to read (or a signal interrupted the wait).
    Ready,
    /// Nothing within the wait.
    Idle,
    /// The terminal hung up (its window or multiplexer closed): nothing more
    /// will come, and nobody sees the screen.
    Gone,
}

/// Waits up to `timeout` for the terminal's input: standard input, or
/// /dev/tty when that is not a terminal (as crossterm reads). Done here with
/// poll(2) rather than crossterm's own wait, which keeps retrying a hung-up
/// terminal without returning.
pub fn wait_for_input(timeout: std::time::Duration) -> io::Result<Input> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let tty;
    let fd = if io::stdin().is_terminal() {
        io::stdin().as_fd().as_raw_fd()
    } else {
        tty = std::fs::File::open("/dev/tty")?;
        tty.as_raw_fd()
    };
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, alive for the call.
    let ready = unsafe { libc::poll(&raw mut poll, 1, millis) };
    if ready < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(Input::Ready)
        } else {
            Err(err)
        };
    }
    Ok(
        if poll.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            Input::Gone
        } else if ready == 0 {
            Input::Idle
        } else {
            Input::Ready
        },
    )
}

/// Routes SIGTERM, SIGINT and SIGHUP (the terminal closing) to
/// [`stop_requested`] instead of killing the process with the terminal
/// still in raw mode and the programs still attached.
pub fn catch_signals() -> io::Result<()> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.map_err(|errno| {
            io::Error::other(format!("installing the {signal} handler failed: {errno}"))
        })?;
    }
    Ok(())
}

/// Leaves the alternate screen and raw mode, and shows the cursor. Safe to
/// call more than once and when the terminal was never set up.
pub fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, Show);
}

fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| chain_panic_hook(restore));
}

/// Makes a panic call `first`, then the hook that was there (which prints
/// the message: after `restore`, on the normal screen).
fn chain_panic_hook(first: fn()) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        first();
        previous(info);
    }));
}

/// The terminal in raw mode on the alternate screen; restored when dropped.
pub struct Screen {
    pub terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    /// Takes over the terminal.
    pub fn enter() -> io::Result<Self> {
        install_panic_hook();
        enable_raw_mode()
            .map_err(|err| io::Error::other(format!("putting the terminal in raw mode: {err}")))?;
        // From here on a failure must undo what was done.
        let undo = Undo;
        execute!(io::stdout(), EnterAlternateScreen, Hide)?;
        let terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
        std::mem::forget(undo);
        Ok(Self { terminal })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Restores the terminal if [`Screen::enter`] fails half way.
struct Undo;

impl Drop for Undo {
    fn drop(&mut self) {
        restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static CALLED: AtomicBool = AtomicBool::new(false);

    fn mark() {
        CALLED.store(true, Ordering::Relaxed);
    }

    #[test]
    fn a_panic_runs_the_restore_hook() {
        chain_panic_hook(mark);
        let result = std::panic::catch_unwind(|| panic!("a panic this test expects"));
        assert!(result.is_err());
        assert!(CALLED.load(Ordering::Relaxed));
    }

    #[test]
    fn signals_only_set_the_flag() {
        catch_signals().unwrap();
        assert!(!stop_requested());
        nix::sys::signal::raise(Signal::SIGTERM).unwrap();
        assert!(
            stop_requested(),
            "SIGTERM was caught, the test process lives on"
        );
        let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            // SAFETY: back to the default disposition.
            unsafe { sigaction(signal, &default) }.unwrap();
        }
    }
}
