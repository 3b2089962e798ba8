// Package gochannel is the embedded broker: Watermill's in-process Go
// channel Pub/Sub, for standalone runs and fast tests.
//
// It wraps Watermill's GoChannel rather than replacing it: no race was
// found in it. The wrapper adds what upstream lacks: a bound (upstream
// holds every unacked message in memory, 7.8 KB each measured with
// 100-byte bodies, and its Publish never refuses; commit 3aa672a) and a
// count of messages dropped for want of a subscriber, which upstream
// drops without a word (commit 5faa0de).
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
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"imcloud/pipeline"
)

// outputBuffer lets a burst of publishes queue without blocking the HTTP
// handler while job works through them.
const outputBuffer = 4096

// ErrQueueFull is returned for a message refused because maxPending
// messages are published and not yet acked.
var ErrQueueFull = fmt.Errorf("embedded broker full: %w", pipeline.ErrQueueFull)

// errClosed is returned for a publish after Close.
var errClosed = errors.New("embedded broker closed")

// PubSub is an in-process Pub/Sub. Messages live only in this process:
// what is queued when it exits is gone, which is the embedded trade-off.
// Watermill's Pub/Sub holds each message in memory, with two goroutines,
// until its subscriber acks it (about 8 KB besides the body: 7.8 KB
// measured with 100-byte bodies), and publishing does not wait; so the
// messages waiting are counted, and at maxPending Publish refuses with
// ErrQueueFull. A message to a topic nobody in the process subscribes to
// is dropped at once, as Watermill does, but not silently: it is counted
// (Unheard) and reported to the unheard callback (the node logs it), since
// the publisher took it as accepted (an op 4 was answered op 5). A topic
// Keep names (the poison topic) is held instead, for a PoisonAdmin, in a
// bounded ring that evicts its oldest message when full.
type PubSub struct {
	gc      *gochannel.GoChannel
	max     int64
	pending atomic.Int64
	closed  atomic.Bool
	unheard atomic.Int64
	// onUnheard is told of each publish that no subscriber received.
	onUnheard func(topic string, msgs int)

	mu   sync.Mutex
	subs map[string]int64 // live subscriptions per topic; each gets a copy
	// kept holds the messages of the topics Keep names (the poison topic).
	kept map[string]*kept
}

// New returns an in-process Pub/Sub holding at most maxPending unacked
// messages; onUnheard (if not nil) is called for each publish to a topic
// without a subscriber, whose messages are dropped.
func New(logger watermill.LoggerAdapter, maxPending int, onUnheard func(topic string, msgs int)) *PubSub {
	gc := gochannel.NewGoChannel(gochannel.Config{OutputChannelBuffer: outputBuffer}, logger)
	return &PubSub{gc: gc, max: int64(max(maxPending, 1)), subs: map[string]int64{}, kept: map[string]*kept{}, onUnheard: onUnheard}
}

// Pending is how many message copies wait for their subscriber's ack, a
// bundle counting as the messages it carries.
func (p *PubSub) Pending() int64 { return p.pending.Load() }

// Unheard is how many messages were published to a topic without a
// subscriber, and dropped.
func (p *PubSub) Unheard() int64 { return p.unheard.Load() }

// Publish hands msgs to topic's subscribers and returns without waiting
// for them, unless maxPending messages are already waiting.
func (p *PubSub) Publish(topic string, msgs ...*message.Message) error {
	if p.closed.Load() {
		return errClosed
	}
	p.mu.Lock()
	n := weight(msgs...) * p.subs[topic]
	k := p.kept[topic]
	p.mu.Unlock()
	if k != nil {
		k.add(msgs)
	} else if n == 0 && len(msgs) > 0 {
		w := weight(msgs...)
		p.unheard.Add(w)
		if p.onUnheard != nil {
			p.onUnheard(topic, int(w))
		}
	}
	if n > 0 {
		if p.pending.Add(n) > p.max {
			p.pending.Add(-n)
			return fmt.Errorf("%w: %d messages wait for their subscriber", ErrQueueFull, p.max)
		}
	}
	if err := p.gc.Publish(topic, msgs...); err != nil {
		p.pending.Add(-n) // nothing was handed over: no slot will be freed
		return err
	}
	return nil
}

// Subscribe subscribes to topic; each message's slot is freed once the
// subscriber acks it, or its subscription ends with it unacked. A nacked
// message comes again, counted still.
func (p *PubSub) Subscribe(ctx context.Context, topic string) (<-chan *message.Message, error) {
	p.mu.Lock()
	in, err := p.gc.Subscribe(ctx, topic)
	if err == nil {
		p.subs[topic]++
	}
	p.mu.Unlock()
	if err != nil {
		return nil, err
	}
	out := make(chan *message.Message)
	go func() {
		defer close(out)
		defer func() {
			p.mu.Lock()
			p.subs[topic]--
			p.mu.Unlock()
		}()
		for m := range in {
			// Its context, read before the subscriber may replace it,
			// ends when Watermill is done with this copy.
			// Its weight too: once handed over, the handler may write
			// its metadata while settle waits.
			go p.settle(m.Context(), m, weight(m))
			select {
			case out <- m:
			case <-ctx.Done():
				// The subscription ended: Watermill drops m, ending its
				// context, and closes in.
			}
		}
	}()
	return out, nil
}

// settle frees m's slot once it is acked or dropped with its subscription.
func (p *PubSub) settle(ctx context.Context, m *message.Message, w int64) {
	select {
	case <-m.Acked():
	case <-m.Nacked():
		return // resent as a new copy, which settles it
	case <-ctx.Done():
	}
	p.pending.Add(-w)
}

// weight counts msgs as the pushes they carry: a bundle
// (pipeline.MetaBundle) as its messages, so that maxPending bounds pushes
// (and the memory they hold) whether or not logic bundled them.
func weight(msgs ...*message.Message) int64 {
	var n int64
	for _, m := range msgs {
		w, err := strconv.Atoi(m.Metadata.Get(pipeline.MetaBundle))
		if err != nil || w < 1 {
			w = 1
		}
		n += int64(w)
	}
	return n
}

// Close refuses further publishes and closes the Pub/Sub.
func (p *PubSub) Close() error {
	p.closed.Store(true)
	return p.gc.Close()
}
