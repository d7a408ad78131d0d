//! The thread that owns a component's sockets (the interchange's worker port, a pool's
//! DEALER and worker streams) and how other threads reach it. One thread owns them and
//! others hand it work through a [`Mailbox`]; this type starts that thread, stops it
//! (idempotent, from any thread, and on drop), and runs the component's exit hook when
//! the thread ends for any reason, a panic included, so callers waiting on it are told.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::transport::Mailbox;

/// Runs `exit` and closes the mailbox when the socket thread ends, however it ends.
struct ExitGuard<I, F: FnOnce()> {
    inbox: Arc<Mailbox<I>>,
    exit: Option<F>,
}

impl<I, F: FnOnce()> Drop for ExitGuard<I, F> {
    fn drop(&mut self) {
        // Items pushed from now on get no answer: drop them (and any reply channel in
        // them) at once instead of letting their senders wait for a timeout.
        self.inbox.close();
        if let Some(exit) = self.exit.take() {
            exit();
        }
    }
}

/// A running socket thread and its mailbox.
pub struct SocketThread<I: Send + 'static> {
    inbox: Arc<Mailbox<I>>,
    /// What to push to ask the thread to return.
    stop: fn() -> I,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl<I: Send + 'static> SocketThread<I> {
    /// Start thread `name` running `body`; `exit` runs on that thread when it ends.
    pub fn spawn(
        name: &str,
        inbox: Arc<Mailbox<I>>,
        stop: fn() -> I,
        body: impl FnOnce() + Send + 'static,
        exit: impl FnOnce() + Send + 'static,
    ) -> Result<Self, String> {
        let guard = ExitGuard {
            inbox: inbox.clone(),
            exit: Some(exit),
        };
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _guard = guard;
                body();
            })
            .map_err(|e| format!("cannot start the {name} thread: {e}"))?;
        Ok(SocketThread {
            inbox,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Hand items to the socket thread (dropped at once if it has ended).
    pub fn push(&self, items: impl IntoIterator<Item = I>) {
        self.inbox.push(items);
    }

    /// Ask the thread to return and wait for it. Idempotent; callable from any thread.
    pub fn stop(&self) {
        let thread = self.thread.lock().unwrap().take();
        if let Some(t) = thread {
            self.inbox.push([(self.stop)()]);
            let _ = t.join();
        }
    }
}

impl<I: Send + 'static> Drop for SocketThread<I> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    enum Msg {
        Work(u32, std::sync::mpsc::Sender<u32>),
        Stop,
    }

    fn echo() -> (SocketThread<Msg>, Arc<AtomicBool>) {
        let inbox = Arc::new(Mailbox::new().unwrap());
        let exited = Arc::new(AtomicBool::new(false));
        let (ib, ex) = (inbox.clone(), exited.clone());
        let t = SocketThread::spawn(
            "echo",
            inbox,
            || Msg::Stop,
            move || loop {
                let mut ep = crate::epoll::Epoll::new(1).unwrap();
                ep.add(ib.fd(), crate::epoll::IN, 0).unwrap();
                ep.wait(1000, &mut Vec::new()).unwrap();
                for m in ib.take() {
                    match m {
                        Msg::Work(13, tx) => {
                            drop(tx);
                            panic!("unlucky");
                        }
                        Msg::Work(n, tx) => tx.send(n * 2).unwrap(),
                        Msg::Stop => return,
                    }
                }
            },
            move || ex.store(true, Ordering::SeqCst),
        )
        .unwrap();
        (t, exited)
    }

    #[test]
    fn serves_its_mailbox_and_stops_once_from_any_caller() {
        let (t, exited) = echo();
        let (tx, rx) = std::sync::mpsc::channel();
        t.push([Msg::Work(21, tx)]);
        assert_eq!(rx.recv().unwrap(), 42);
        t.stop();
        assert!(exited.load(Ordering::SeqCst), "the exit hook ran");
        t.stop(); // idempotent
        let (tx, rx) = std::sync::mpsc::channel();
        t.push([Msg::Work(1, tx)]);
        assert!(
            rx.recv().is_err(),
            "after the end a reply channel disconnects"
        );
    }

    #[test]
    fn a_panic_still_runs_the_exit_hook_and_closes_the_mailbox() {
        let (t, exited) = echo();
        let (tx, rx) = std::sync::mpsc::channel();
        t.push([Msg::Work(13, tx)]);
        assert!(rx.recv().is_err());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !exited.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(exited.load(Ordering::SeqCst));
        let (tx, rx) = std::sync::mpsc::channel();
        t.push([Msg::Work(1, tx)]);
        assert!(rx.recv().is_err());
        drop(t); // joins the panicked thread without panicking here
    }
}
