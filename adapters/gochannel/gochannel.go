// Package gochannel is the embedded broker: an in-process Pub/Sub for
// standalone runs and fast tests, with Watermill's Pub/Sub interfaces.
//
// It began as a wrapper of Watermill's GoChannel and replaced it (issue
// 15). GoChannel gives every subscription of a topic a copy of each
// message, and hands each one over the moment it is published, on two
// goroutines of its own that live until it is acked, however many job
// already has in hand: under 64 concurrent single pushes (wrk) job fell
// behind logic and the backlog piled up as those goroutines (29,000 of
// them, 24 MB of stacks, GC at 14 % of the CPU) at 18–20k pushes/s. Here
// subscriptions to a topic share its queue, as a RabbitMQ queue's
// consumers do, each with at most subscriptionWindow messages out, and a
// message waiting costs its slot in the queue and nothing else: 30–34k
// pushes/s in the same run. What the wrapper added is kept: a bound on
// unacked messages (upstream held every one, 7.8 KB each measured with
// 100-byte bodies, and its Publish never refused; commit 3aa672a) and a
// count of messages dropped for want of a subscriber (commit 5faa0de).
package gochannel

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/pipeline"
)

// subscriptionWindow is how many messages one subscription has out at
// once (a RabbitMQ consumer's prefetch). Job's deliveries must overlap:
// a cloud node writes the room pushes that reach a connection together
// in one write, and at one message out per subscription each push went
// alone (10,000 clients × 50 pushes/s: 1.0 packet per write against 2.5,
// and 1.2 M of 4 M deliveries late). Watermill's GoChannel handed out
// all it had (4,096 buffered, more waiting as goroutines).
const subscriptionWindow = 256

// ErrQueueFull is returned for a message refused because maxPending
// messages are published and not yet acked.
var ErrQueueFull = fmt.Errorf("embedded broker full: %w", pipeline.ErrQueueFull)

// errClosed is returned for a publish after Close.
var errClosed = errors.New("embedded broker closed")

// PubSub is an in-process Pub/Sub. Messages live only in this process:
// what is queued when it exits is gone, which is the embedded trade-off.
// Each topic is one queue its subscriptions share (competing consumers,
// pipeline.Broker.SharedQueue); each subscription has at most
// subscriptionWindow messages out, and a nacked one is queued again. Messages published and not yet acked are
// counted (a bundle as the pushes it carries), and at maxPending Publish
// refuses with ErrQueueFull. A message to a topic nobody in the process
// subscribes to is dropped at once, but not silently: it is counted
// (Unheard) and reported to the unheard callback (the node logs it),
// since the publisher took it as accepted (an op 4 was answered op 5). A
// topic Keep names (the poison topic) is held instead, for a PoisonAdmin,
// in a bounded ring that evicts its oldest message when full.
type PubSub struct {
	max     int64
	pending atomic.Int64
	closed  atomic.Bool
	done    chan struct{} // closed by Close
	unheard atomic.Int64
	// onUnheard is told of each publish that no subscriber received.
	onUnheard func(topic string, msgs int)

	mu     sync.Mutex
	queues map[string]*queue
	// kept holds the messages of the topics Keep names (the poison topic).
	kept map[string]*kept
}

// New returns an in-process Pub/Sub holding at most maxPending unacked
// messages; onUnheard (if not nil) is called for each publish to a topic
// without a subscriber, whose messages are dropped. The logger is
// Watermill's, which the broker no longer writes to.
func New(_ watermill.LoggerAdapter, maxPending int, onUnheard func(topic string, msgs int)) *PubSub {
	return &PubSub{max: int64(max(maxPending, 1)), done: make(chan struct{}), queues: map[string]*queue{}, kept: map[string]*kept{}, onUnheard: onUnheard}
}

// queue is one topic's messages waiting for a subscription.
type queue struct {
	mu    sync.Mutex
	items []*message.Message
	head  int
	subs  int           // live subscriptions; guarded by PubSub.mu
	ready chan struct{} // a message may be waiting (capacity 1)
}

func (q *queue) put(m *message.Message) {
	q.mu.Lock()
	q.items = append(q.items, m)
	q.mu.Unlock()
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// take returns the next message, waiting for one until ctx or done ends.
func (q *queue) take(ctx context.Context, done <-chan struct{}) *message.Message {
	for {
		q.mu.Lock()
		if q.head < len(q.items) {
			m := q.items[q.head]
			q.items[q.head] = nil
			q.head++
			more := q.head < len(q.items)
			if !more {
				// Empty: start again at the front (keeps the slice's
				// memory, not its messages).
				q.items, q.head = q.items[:0], 0
			} else if q.head > len(q.items)/2 && q.head > 1024 {
				n := copy(q.items, q.items[q.head:])
				clear(q.items[n:])
				q.items, q.head = q.items[:n], 0
			}
			q.mu.Unlock()
			if more {
				// One signal wakes one waiter: pass it on.
				select {
				case q.ready <- struct{}{}:
				default:
				}
			}
			return m
		}
		q.mu.Unlock()
		select {
		case <-q.ready:
		case <-ctx.Done():
			return nil
		case <-done:
			return nil
		}
	}
}

// heardLocked reports whether topic has a subscription; p.mu is held.
func (p *PubSub) heardLocked(topic string) bool {
	q := p.queues[topic]
	return q != nil && q.subs > 0
}

// drain removes and returns what waits.
func (q *queue) drain() []*message.Message {
	q.mu.Lock()
	defer q.mu.Unlock()
	left := q.items[q.head:]
	q.items, q.head = nil, 0 // what was read before head goes with the old array
	return left
}

// Pending is how many published messages wait for a subscriber's ack, a
// bundle counting as the messages it carries.
func (p *PubSub) Pending() int64 { return p.pending.Load() }

// Unheard is how many messages were published to a topic without a
// subscriber, and dropped.
func (p *PubSub) Unheard() int64 { return p.unheard.Load() }

// Publish queues msgs on topic and returns without waiting for them,
// unless maxPending messages are already waiting.
func (p *PubSub) Publish(topic string, msgs ...*message.Message) error {
	if p.closed.Load() {
		return errClosed
	}
	w := weight(msgs...)
	// Queued under p.mu, so that a topic's last subscription, which
	// drains what waits as it ends (Subscribe), cannot end in between.
	p.mu.Lock()
	q := p.queues[topic]
	heard := p.heardLocked(topic)
	k := p.kept[topic]
	full := false
	if heard {
		if p.pending.Add(w) > p.max {
			p.pending.Add(-w)
			full = true
		} else {
			for _, m := range msgs {
				q.put(m)
			}
		}
	}
	p.mu.Unlock()
	if k != nil {
		k.add(msgs)
	} else if !heard && len(msgs) > 0 {
		p.countUnheard(topic, w)
	}
	if full {
		return fmt.Errorf("%w: %d messages wait for their subscriber", ErrQueueFull, p.max)
	}
	return nil
}

// Subscribe subscribes to topic, sharing its messages with the topic's
// other subscriptions. A message's slot is freed once it is acked; a
// nacked one is queued again, counted still; when the topic's last
// subscription ends, what waits is dropped and counted unheard, as a
// publish to a topic without subscribers is.
func (p *PubSub) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	if p.closed.Load() {
		return nil, errClosed
	}
	p.mu.Lock()
	q := p.queues[topic]
	if q == nil {
		q = &queue{ready: make(chan struct{}, 1)}
		p.queues[topic] = q
	}
	q.subs++
	p.mu.Unlock()
	out := make(chan *message.Message)
	go func() {
		defer close(out)
		defer func() {
			p.mu.Lock()
			q.subs--
			var left []*message.Message
			if q.subs == 0 {
				left = q.drain()
			}
			p.mu.Unlock()
			p.dropUnheard(topic, left)
		}()
		// A slot per message out, freed when it settles.
		slots := make(chan struct{}, subscriptionWindow)
		for {
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return
			case <-p.done:
				return
			}
			m := q.take(ctx, p.done)
			if m == nil {
				return
			}
			if ctx.Err() != nil {
				p.requeue(topic, q, m) // not handed over: another subscription's
				return
			}
			// Its weight is read from m, not from the copy the handler
			// may write metadata to.
			w := weight(m)
			c := m.Copy()
			c.SetContext(ctx)
			select {
			case out <- c:
			case <-ctx.Done():
				p.requeue(topic, q, m)
				return
			case <-p.done:
				p.pending.Add(-w)
				return
			}
			// Settled by its handler even after the subscription ends
			// (Watermill's router acks or nacks every message it took):
			// a nack then goes to another subscription, if any.
			go func() {
				defer func() { <-slots }()
				select {
				case <-c.Acked():
					p.pending.Add(-w)
				case <-c.Nacked():
					p.requeue(topic, q, m)
				case <-p.done:
					p.pending.Add(-w)
				}
			}()
		}
	}()
	return out, nil
}

// requeue queues m again for the topic's subscriptions; with none left
// it is dropped as unheard (its slot freed), not kept where nothing
// reads it.
func (p *PubSub) requeue(topic string, q *queue, m *message.Message) {
	p.mu.Lock()
	if q.subs > 0 {
		q.put(m)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	p.dropUnheard(topic, []*message.Message{m})
}

// dropUnheard frees the slots of msgs, which no subscription will read,
// and counts and reports them as unheard.
func (p *PubSub) dropUnheard(topic string, msgs []*message.Message) {
	if len(msgs) == 0 {
		return
	}
	w := weight(msgs...)
	p.pending.Add(-w)
	p.countUnheard(topic, w)
}

// countUnheard counts w pushes published to topic that no subscription
// read, and reports them.
func (p *PubSub) countUnheard(topic string, w int64) {
	p.unheard.Add(w)
	if p.onUnheard != nil {
		p.onUnheard(topic, int(w))
	}
}

// weight counts msgs as the pushes they carry: a bundle
// (pipeline.MetaBundle) as its messages, so that maxPending bounds pushes
// (and the memory they hold) whether or not logic bundled them.
func weight(msgs ...*message.Message) int64 {
	var n int64
	for _, m := range msgs {
		w := 1
		if v := m.Metadata.Get(pipeline.MetaBundle); v != "" { // not on every single push: Atoi's error allocates
			if b, err := strconv.Atoi(v); err == nil && b > 1 {
				w = b
			}
		}
		n += int64(w)
	}
	return n
}

// Close refuses further publishes and ends every subscription.
func (p *PubSub) Close() error {
	if !p.closed.Swap(true) {
		close(p.done)
	}
	return nil
}
