//! Deny events for the detail pane, from the daemon's events socket: its
//! recent buffer first, then every new event, read on a thread and handed
//! over through a channel (the drawing loop never blocks on the socket).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, TryRecvError},
    thread,
};

use crate::events::{Record, Request};

/// A connection to the daemon's events socket.
pub struct Feed {
    records: Receiver<Result<Record, String>>,
    stream: UnixStream,
    path: PathBuf,
}

/// What [`Feed::drain`] found.
#[derive(Debug, Default)]
pub struct Drained {
    pub records: Vec<Record>,
    /// Why the feed ended, if it did.
    pub ended: Option<String>,
}

impl Feed {
    /// Connects and asks for the recent events and every new one.
    pub fn connect(path: &Path) -> Result<Self, String> {
        let mut stream = UnixStream::connect(path)
            .map_err(|err| format!("no daemon events socket at {} ({err})", path.display()))?;
        let request = Request {
            since_unix_ms: Some(0),
            follow: true,
        };
        let line = serde_json::to_string(&request).unwrap_or_default() + "\n";
        stream
            .write_all(line.as_bytes())
            .map_err(|err| format!("writing to the events socket {}: {err}", path.display()))?;
        let reader = stream
            .try_clone()
            .map_err(|err| format!("reading the events socket {}: {err}", path.display()))?;
        let (send, records) = mpsc::channel();
        let shown = path.display().to_string();
        thread::Builder::new()
            .name("top-events".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let item = match line {
                        Ok(line) => serde_json::from_str::<Record>(&line)
                            .map_err(|err| format!("an event from {shown} is not JSON: {err}")),
                        Err(err) => Err(format!("reading the events socket {shown}: {err}")),
                    };
                    let failed = item.is_err();
                    if send.send(item).is_err() || failed {
                        return;
                    }
                }
                let _ = send.send(Err(format!("the daemon closed its events socket {shown}")));
            })
            .map_err(|err| format!("starting the events reader: {err}"))?;
        Ok(Self {
            records,
            stream,
            path: path.to_path_buf(),
        })
    }

    /// Everything that arrived since the last call.
    pub fn drain(&self) -> Drained {
        let mut drained = Drained::default();
        loop {
            match self.records.try_recv() {
                Ok(Ok(record)) => drained.records.push(record),
                Ok(Err(why)) => {
                    drained.ended = Some(why);
                    return drained;
                }
                Err(TryRecvError::Empty) => return drained,
                Err(TryRecvError::Disconnected) => {
                    drained.ended = Some(format!(
                        "the events reader of {} stopped",
                        self.path.display()
                    ));
                    return drained;
                }
            }
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        // Ends the reader thread's blocking read.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}
