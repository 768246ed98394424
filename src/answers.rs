//! Answers a shard awaits from other shards, matched to their requests by key.
//!
//! Owns one table per shard: a slot for each request sent to another shard and not yet
//! answered. The request carries the slot's [`AnswerKey`]; the other shard sends its answer
//! back on the mesh as an ordinary message, and the receiving shard's pump puts it in the slot
//! ([`Answers::answer`]) and wakes the waiting task, on its own thread. Compared with a
//! oneshot channel per request, nothing is allocated per request once the table has grown to
//! the most requests ever in flight, the answer rides in a ring batch with whatever else goes
//! the same way (the deliveries of the same publish, other answers), and the ring's one wake-up
//! per batch replaces a cross-thread wake-up per answer.
//!
//! A waiter that goes away before its answer (its connection closed) leaves its slot
//! abandoned: the slot is freed when the answer comes, never reused before, so an answer can
//! only reach the request it answers. Bounded by the requests in flight, which the senders'
//! outboxes bound (a congested outbox refuses new publishes).
//!
//! Must never: cross threads (it is `Rc`, one per shard), or free a slot whose answer is
//! still to come.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Which slot of the requesting shard's table an answer fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerKey(u32);

/// The slots of one shard's outstanding requests.
pub struct Answers<T> {
    table: RefCell<Table<T>>,
}

struct Table<T> {
    slots: Vec<Slot<T>>,
    /// Free slot indexes, the most recently freed last (its memory is the warmest).
    free: Vec<u32>,
}

enum Slot<T> {
    Free,
    /// Sent, not answered; the waker of the task that last polled for it.
    Waiting(Option<Waker>),
    Answered(T),
    /// Its waiter went away; freed when its answer comes.
    Abandoned,
}

impl<T> Answers<T> {
    pub fn new() -> Rc<Answers<T>> {
        Rc::new(Answers {
            table: RefCell::new(Table {
                slots: Vec::new(),
                free: Vec::new(),
            }),
        })
    }

    /// A slot for a request about to be sent; send [`Awaited::key`] with it.
    pub fn expect(self: &Rc<Self>) -> Awaited<T> {
        let mut table = self.table.borrow_mut();
        let index = match table.free.pop() {
            Some(index) => {
                table.slots[index as usize] = Slot::Waiting(None);
                index
            }
            None => {
                // A shard has far fewer than 4 billion requests in flight (the outbox's bound).
                let index = u32::try_from(table.slots.len()).expect("requests in flight fit u32");
                table.slots.push(Slot::Waiting(None));
                index
            }
        };
        Awaited {
            answers: self.clone(),
            key: Some(AnswerKey(index)),
        }
    }

    /// Fills the slot `key` and wakes its waiter. An answer whose waiter went away frees the
    /// slot. False for a key with no request waiting (a peer's bug: the answer is dropped).
    pub fn answer(&self, key: AnswerKey, value: T) -> bool {
        let mut table = self.table.borrow_mut();
        let Some(slot) = table.slots.get_mut(key.0 as usize) else {
            return false;
        };
        match std::mem::replace(slot, Slot::Free) {
            Slot::Waiting(waker) => {
                *slot = Slot::Answered(value);
                drop(table);
                if let Some(waker) = waker {
                    waker.wake();
                }
                true
            }
            Slot::Abandoned => {
                table.free.push(key.0);
                true
            }
            other => {
                *slot = other;
                false
            }
        }
    }

    /// Requests sent and not yet answered, abandoned ones included (a scan: for tests).
    #[cfg(test)]
    pub fn outstanding(&self) -> usize {
        let table = self.table.borrow();
        table
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Waiting(_) | Slot::Abandoned))
            .count()
    }
}

/// One request's answer to come: a future, or [`Awaited::try_take`] to look without waiting.
/// Dropping it before the answer abandons the slot.
pub struct Awaited<T> {
    answers: Rc<Answers<T>>,
    /// `None` once the answer was taken.
    key: Option<AnswerKey>,
}

impl<T> Awaited<T> {
    /// The key the request carries. Panics after the answer was taken (a programmer error).
    pub fn key(&self) -> AnswerKey {
        self.key.expect("the key of a request still awaited")
    }

    /// The answer when it is in, without waiting; `None` before, and after it was taken.
    pub fn try_take(&mut self) -> Option<T> {
        self.take(None)
    }

    /// Takes the answer and frees the slot, or leaves `waker` to be woken by it.
    fn take(&mut self, waker: Option<&Waker>) -> Option<T> {
        let key = self.key?;
        let mut table = self.answers.table.borrow_mut();
        let slot = &mut table.slots[key.0 as usize];
        match slot {
            Slot::Answered(_) => {
                let Slot::Answered(value) = std::mem::replace(slot, Slot::Free) else {
                    unreachable!("matched as answered")
                };
                table.free.push(key.0);
                self.key = None;
                Some(value)
            }
            Slot::Waiting(registered) => {
                if let Some(waker) = waker {
                    match registered {
                        Some(r) if r.will_wake(waker) => {}
                        _ => *registered = Some(waker.clone()),
                    }
                }
                None
            }
            Slot::Free | Slot::Abandoned => unreachable!("an awaited slot is waiting or answered"),
        }
    }
}

impl<T> Future for Awaited<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        // `Awaited` holds no self-reference: it is `Unpin`.
        match self.get_mut().take(Some(cx.waker())) {
            Some(value) => Poll::Ready(value),
            None => Poll::Pending,
        }
    }
}

impl<T> Drop for Awaited<T> {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let mut table = self.answers.table.borrow_mut();
        let slot = &mut table.slots[key.0 as usize];
        if matches!(slot, Slot::Answered(_)) {
            *slot = Slot::Free;
            table.free.push(key.0);
        } else {
            *slot = Slot::Abandoned;
        }
    }
}

/// A waker that counts its wake-ups, for tests that poll answers by hand (here and in
/// `shard`).
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    #[derive(Default)]
    pub(crate) struct CountWakes(AtomicUsize);

    impl CountWakes {
        pub(crate) fn new() -> Arc<CountWakes> {
            Arc::default()
        }

        pub(crate) fn waker(self: &Arc<Self>) -> Waker {
            Waker::from(self.clone())
        }

        pub(crate) fn count(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::CountWakes;
    use super::*;
    use std::sync::Arc;

    fn poll<T>(awaited: &mut Awaited<T>, wakes: &Arc<CountWakes>) -> Poll<T> {
        Pin::new(awaited).poll(&mut Context::from_waker(&wakes.waker()))
    }

    #[test]
    fn an_answer_reaches_its_own_request_and_wakes_it() {
        let answers = Answers::new();
        let (mut a, mut b) = (answers.expect(), answers.expect());
        assert_ne!(a.key(), b.key());
        let wakes = CountWakes::new();
        assert!(poll(&mut a, &wakes).is_pending());
        assert!(poll(&mut b, &wakes).is_pending());
        assert!(answers.answer(b.key(), "for b"));
        assert_eq!(wakes.count(), 1, "only b's waiter is woken");
        assert_eq!(a.try_take(), None, "a is still waiting");
        assert_eq!(poll(&mut b, &wakes), Poll::Ready("for b"));
        assert!(answers.answer(a.key(), "for a"));
        assert_eq!(a.try_take(), Some("for a"));
        assert_eq!(a.try_take(), None, "an answer is taken once");
        assert_eq!(answers.outstanding(), 0);
    }

    #[test]
    fn a_slot_is_reused_only_after_its_answer_is_taken() {
        let answers = Answers::new();
        let mut first = answers.expect();
        let key = first.key();
        let second = answers.expect();
        assert_ne!(second.key(), key, "a slot waiting is not handed out again");
        assert!(answers.answer(key, 1));
        let third = answers.expect();
        assert_ne!(third.key(), key, "nor one answered and not yet taken");
        assert_eq!(first.try_take(), Some(1));
        assert_eq!(
            answers.expect().key(),
            key,
            "a taken slot is the next one used"
        );
    }

    #[test]
    fn an_abandoned_slot_waits_for_its_answer_before_it_is_reused() {
        let answers = Answers::new();
        let gone = answers.expect();
        let key = gone.key();
        drop(gone);
        assert_eq!(answers.outstanding(), 1, "the answer is still to come");
        let other = answers.expect();
        assert_ne!(other.key(), key);
        assert!(
            answers.answer(key, "late"),
            "the late answer frees the slot"
        );
        assert_eq!(answers.outstanding(), 1, "only `other` is outstanding");
        assert_eq!(answers.expect().key(), key);
    }

    #[test]
    fn an_answered_slot_dropped_unread_is_freed() {
        let answers = Answers::new();
        let unread = answers.expect();
        let key = unread.key();
        assert!(answers.answer(key, 5));
        drop(unread);
        assert_eq!(answers.outstanding(), 0);
        assert_eq!(answers.expect().key(), key);
    }

    #[test]
    fn an_answer_nobody_awaits_is_refused_and_changes_nothing() {
        let answers: Rc<Answers<u8>> = Answers::new();
        assert!(!answers.answer(AnswerKey(0), 1), "no such slot");
        let mut waiting = answers.expect();
        let key = waiting.key();
        assert!(answers.answer(key, 1));
        assert!(!answers.answer(key, 2), "a second answer for one request");
        assert_eq!(waiting.try_take(), Some(1), "the first answer stands");
        assert!(!answers.answer(key, 3), "a freed slot takes no answer");
        assert_eq!(answers.outstanding(), 0);
    }

    #[test]
    fn a_waiter_polled_again_is_woken_once_with_its_latest_waker() {
        let answers = Answers::new();
        let mut awaited = answers.expect();
        let (old, new) = (CountWakes::new(), CountWakes::new());
        assert!(poll(&mut awaited, &old).is_pending());
        assert!(poll(&mut awaited, &new).is_pending());
        assert!(answers.answer(awaited.key(), ()));
        assert_eq!(old.count(), 0);
        assert_eq!(new.count(), 1);
    }
}
