//! A one-shot reply slot that can be waited on from a thread (`wait`) or awaited from async code
//! (`Ticket` implements `Future`), with no async runtime dependency.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::error::LedgerError;

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

struct Shared<T> {
    slot: Mutex<Slot<T>>,
    ready: Condvar,
}

/// The writing end of a one-shot slot.
pub(crate) struct Reply<T> {
    shared: Option<Arc<Shared<T>>>,
    /// What a dropped, unanswered reply delivers.
    on_drop: Option<T>,
}

/// The reading end.
pub(crate) struct Pending<T> {
    shared: Arc<Shared<T>>,
}

pub(crate) fn oneshot<T>(on_drop: T) -> (Reply<T>, Pending<T>) {
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot {
            value: None,
            waker: None,
        }),
        ready: Condvar::new(),
    });
    (
        Reply {
            shared: Some(shared.clone()),
            on_drop: Some(on_drop),
        },
        Pending { shared },
    )
}

impl<T> Reply<T> {
    pub fn send(mut self, value: T) {
        self.deliver(value);
    }

    fn deliver(&mut self, value: T) {
        if let Some(shared) = self.shared.take() {
            let waker = {
                let mut slot = shared.slot.lock().unwrap_or_else(|p| p.into_inner());
                slot.value = Some(value);
                slot.waker.take()
            };
            shared.ready.notify_all();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

impl<T> Drop for Reply<T> {
    fn drop(&mut self) {
        if let Some(v) = self.on_drop.take() {
            self.deliver(v);
        }
    }
}

impl<T> Pending<T> {
    pub fn wait(self) -> T {
        let mut slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = slot.value.take() {
                return v;
            }
            slot = self
                .shared
                .ready
                .wait(slot)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn wait_timeout(&self, timeout: Duration) -> Option<T> {
        let slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        let (mut slot, _) = self
            .shared
            .ready
            .wait_timeout_while(slot, timeout, |s| s.value.is_none())
            .unwrap_or_else(|p| p.into_inner());
        slot.value.take()
    }

    fn poll_value(&self, cx: &mut Context<'_>) -> Poll<T> {
        let mut slot = self.shared.slot.lock().unwrap_or_else(|p| p.into_inner());
        match slot.value.take() {
            Some(v) => Poll::Ready(v),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// The promise of an append: resolves to the event's sequence number once it is durable (see
/// `Durability`), or to the error that stopped it. Block with `wait`, or `.await` it.
pub struct Ticket {
    pending: Pending<Result<u64, LedgerError>>,
}

impl Ticket {
    pub(crate) fn new() -> (Reply<Result<u64, LedgerError>>, Ticket) {
        let (reply, pending) = oneshot(Err(LedgerError::Closed));
        (reply, Ticket { pending })
    }

    pub(crate) fn ready(result: Result<u64, LedgerError>) -> Ticket {
        let (reply, ticket) = Ticket::new();
        reply.send(result);
        ticket
    }

    /// Blocks until the event is durable; returns its sequence number.
    pub fn wait(self) -> Result<u64, LedgerError> {
        self.pending.wait()
    }

    /// As `wait`, giving up after `timeout` (`None`: not yet; the ticket stays valid).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<u64, LedgerError>> {
        self.pending.wait_timeout(timeout)
    }
}

impl Future for Ticket {
    type Output = Result<u64, LedgerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.pending.poll_value(cx)
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket")
    }
}
