//! Frames one shard hands to another for the connections that live there.
//!
//! A room's shard fans a frame out to members whose connections run on other shards' threads.
//! Pushing into each of their outboxes from the room's thread would cost a contended lock and a
//! cross-thread wake-up per member. Instead it posts one [`Delivery`] per shard that has
//! members: the frame (shared bytes) and that shard's member list. The receiving shard pushes
//! into the outboxes on its own thread, where waking a connection's task is a local operation.
//! Frames from one shard to one connection keep their order: everything the room's shard sends
//! to a connection on another shard goes through that shard's mailbox.
//!
//! Each mailbox is bounded in bytes. When it is full, its shard is not keeping up: the frames
//! are treated as its connections' outboxes treat overflow (ephemeral frames dropped, and a
//! durable frame closes the connection with 1013), never queued without bound.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::outbox::{FrameClass, Outbox};

/// What a shard posts to another.
pub enum Delivery {
    /// One frame for many connections (a broadcast).
    Broadcast {
        frame: Bytes,
        class: FrameClass,
        outboxes: Vec<Arc<Outbox>>,
    },
    /// One frame for one connection (a direct reply).
    Direct {
        frame: Bytes,
        class: FrameClass,
        outbox: Arc<Outbox>,
    },
}

impl Delivery {
    /// What the delivery holds, for the mailbox's bound: the frame once, plus its list.
    fn cost(&self) -> usize {
        match self {
            Delivery::Broadcast {
                frame, outboxes, ..
            } => frame.len() + outboxes.len() * std::mem::size_of::<Arc<Outbox>>(),
            Delivery::Direct { frame, .. } => frame.len(),
        }
    }

    /// Pushes the frame into every outbox named (on the receiving shard's thread).
    pub fn deliver(self) {
        match self {
            Delivery::Broadcast {
                frame,
                class,
                outboxes,
            } => {
                for outbox in outboxes {
                    outbox.push(frame.clone(), class);
                }
            }
            Delivery::Direct {
                frame,
                class,
                outbox,
            } => {
                outbox.push(frame, class);
            }
        }
    }

    /// The delivery could not be queued: each connection named loses the frame as if its own
    /// queue had overflowed.
    fn refuse(self) {
        let refuse_one = |outbox: &Outbox, class: FrameClass| match class {
            FrameClass::Ephemeral => outbox.count_dropped(),
            FrameClass::Durable => outbox.overflow(),
        };
        match self {
            Delivery::Broadcast {
                class, outboxes, ..
            } => {
                for outbox in &outboxes {
                    refuse_one(outbox, class);
                }
            }
            Delivery::Direct { class, outbox, .. } => refuse_one(&outbox, class),
        }
    }
}

struct State {
    deliveries: Vec<Delivery>,
    bytes: usize,
    /// The receiving shard's loop, waiting for deliveries.
    waker: Option<Waker>,
}

/// A shard's inbox for deliveries from the other shards.
pub struct Mailbox {
    state: Mutex<State>,
    max_bytes: usize,
}

impl Mailbox {
    pub fn new(max_bytes: usize) -> Mailbox {
        Mailbox {
            state: Mutex::new(State {
                deliveries: Vec::new(),
                bytes: 0,
                waker: None,
            }),
            max_bytes: max_bytes.max(1),
        }
    }

    /// Queues a delivery for the receiving shard and wakes it if it waits. When the mailbox is
    /// full the delivery is refused on the spot (see the module docs).
    pub fn post(&self, delivery: Delivery) {
        let cost = delivery.cost();
        let mut state = self.state.lock().expect("mailbox lock poisoned");
        if state.bytes + cost > self.max_bytes && !state.deliveries.is_empty() {
            drop(state);
            delivery.refuse();
            return;
        }
        state.bytes += cost;
        state.deliveries.push(delivery);
        // Only the post that finds the shard waiting wakes it; it takes everything at once.
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Moves every queued delivery into `into`, or registers the shard's loop to be woken by
    /// the next post.
    pub fn poll_take(&self, cx: &mut Context<'_>, into: &mut Vec<Delivery>) -> Poll<()> {
        let mut state = self.state.lock().expect("mailbox lock poisoned");
        if state.deliveries.is_empty() {
            match &mut state.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        std::mem::swap(&mut state.deliveries, into);
        state.bytes = 0;
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{Bound, Frames, OutboxMetrics, Taken, Written};

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(
            Bound {
                frames: 16,
                bytes: 1 << 20,
            },
            OutboxMetrics::unregistered(),
        ))
    }

    #[test]
    fn deliveries_reach_every_outbox_in_posting_order() {
        let mailbox = Mailbox::new(1 << 20);
        let (a, b) = (outbox(), outbox());
        mailbox.post(Delivery::Broadcast {
            frame: Bytes::from_static(b"one"),
            class: FrameClass::Durable,
            outboxes: vec![a.clone(), b.clone()],
        });
        mailbox.post(Delivery::Direct {
            frame: Bytes::from_static(b"two"),
            class: FrameClass::Durable,
            outbox: a.clone(),
        });
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut taken = Vec::new();
        assert_eq!(mailbox.poll_take(&mut cx, &mut taken), Poll::Ready(()));
        taken.into_iter().for_each(Delivery::deliver);
        let mut frames = Frames::new();
        assert_eq!(a.take(&mut frames, Written::default()), Taken::Frames);
        let got: Vec<&[u8]> = frames.iter().map(|(f, _)| &f[..]).collect();
        assert_eq!(got, [&b"one"[..], &b"two"[..]]);
        assert_eq!(b.len(), 1);
        assert_eq!(mailbox.poll_take(&mut cx, &mut Vec::new()), Poll::Pending);
    }

    #[test]
    fn a_full_mailbox_closes_the_connections_a_durable_frame_was_for() {
        let mailbox = Mailbox::new(8);
        let (a, b) = (outbox(), outbox());
        mailbox.post(Delivery::Direct {
            frame: Bytes::from_static(b"12345678"),
            class: FrameClass::Durable,
            outbox: a.clone(),
        });
        mailbox.post(Delivery::Direct {
            frame: Bytes::from_static(b"typing"),
            class: FrameClass::Ephemeral,
            outbox: b.clone(),
        });
        assert!(b.closing().is_none(), "an ephemeral frame is only dropped");
        mailbox.post(Delivery::Direct {
            frame: Bytes::from_static(b"chat"),
            class: FrameClass::Durable,
            outbox: b.clone(),
        });
        assert_eq!(b.closing().map(|c| c.code), Some(1013));
        assert!(a.closing().is_none());
    }
}
