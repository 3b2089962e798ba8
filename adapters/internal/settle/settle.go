// Package settle is what the broker adapters of our own (amqp, nats)
// share between a delivery and its handler: waiting for the handler's Ack
// or Nack on each *message.Message, the ack timeout, the nack redelivery
// delay, the drain when a subscription stops, and the timing defaults
// behind them. The broker calls (ack, requeue) stay in each adapter: only
// it knows whether its broker can delay a redelivery itself.
package settle

import (
	"context"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// Timing holds the adapters' timing defaults; every value says why.
type Timing struct {
	// NackDelay holds a nacked message before the broker redelivers it,
	// so that a failing message is not redelivered in a hot loop. Job
	// nacks only what it hands back: a message held for a configuration
	// fault (a wrong cluster.secret), or one whose poison publish failed;
	// what fails every retry is poisoned and acked. The delay only paces
	// that loop; 1 s was chosen, not measured, when the AMQP subscriber
	// (114279f) and the NATS one (d261cf4) were written, and Redis
	// Streams uses the same.
	NackDelay time.Duration
	// AckTimeout is how long a handed-out message may stay unsettled
	// before its handler is presumed gone and the broker gives the
	// message to another job (JetStream AckWait, Redis Streams MaxIdle,
	// and the AMQP subscriber's requeue). It must exceed what job spends
	// on one message, or a message still being worked on is doubled:
	// config.JobWorstCase sums it (1m49.2s with the defaults), and the
	// adapters package sets this from broker.*.redeliver_after, which
	// start-up refuses at or below that sum. 2 min is those keys'
	// default; this one serves an adapter built without them (tests).
	AckTimeout time.Duration
	// ReconnectFirst and ReconnectMax bound the backoff between attempts
	// to reach a broker that dropped the connection: the first retry
	// comes soon enough to hide a blip, and a restarted broker is found
	// within ReconnectMax (e2e TestIntegrationRabbitMQRestart: pushes
	// flow again after a RabbitMQ stop_app/start_app, none lost).
	ReconnectFirst, ReconnectMax time.Duration
	// ConfirmTimeout bounds the wait for the broker's confirm of a publish
	// (RabbitMQ publisher confirm, JetStream publish ack) when the
	// message's context has no deadline of its own, so a publish to a
	// broker that stopped answering fails rather than hangs logic's
	// HTTP handler.
	ConfirmTimeout time.Duration
}

// DefaultTiming returns the defaults the adapters run with.
func DefaultTiming() Timing {
	return Timing{
		NackDelay:      time.Second,
		AckTimeout:     2 * time.Minute,
		ReconnectFirst: 100 * time.Millisecond,
		ReconnectMax:   5 * time.Second,
		ConfirmTimeout: 10 * time.Second,
	}
}

// NextBackoff is the wait after one of prev: ReconnectFirst at first
// (prev 0), then doubling up to ReconnectMax.
func (t Timing) NextBackoff(prev time.Duration) time.Duration {
	if prev <= 0 {
		return t.ReconnectFirst
	}
	return min(2*prev, t.ReconnectMax)
}

// Outcome is how the wait for a delivery's messages ended.
type Outcome int

const (
	// Acked: every message was acked; the delivery is done.
	Acked Outcome = iota
	// Nacked: every message was settled and at least one was nacked; the
	// delivery goes back to the broker after Timing.NackDelay, all of it
	// (the dedupe middleware drops what was already handled). A broker
	// that cannot delay a redelivery itself waits with Hold first.
	Nacked
	// TimedOut: some message stayed unsettled for the ack timeout.
	TimedOut
	// Stopped: the subscription stopped with some message unsettled; the
	// delivery goes back to the broker at once.
	Stopped
)

func (o Outcome) String() string {
	switch o {
	case Acked:
		return "acked"
	case Nacked:
		return "nacked"
	case TimedOut:
		return "timed out"
	case Stopped:
		return "stopped"
	}
	return "unknown"
}

// Await waits until every one of msgs is acked or nacked, until timeout
// (none if not positive) passes, or until stop closes. A message that was
// settled by then counts as settled even if stop or the timeout is seen at
// the same moment, so a handler's ack is never thrown away for a race.
func Await(stop <-chan struct{}, timeout time.Duration, msgs ...*message.Message) Outcome {
	var expired <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		expired = t.C
	}
	nacked := false
	for i, msg := range msgs {
		select {
		case <-msg.Acked():
		case <-msg.Nacked():
			nacked = true
		case <-stop:
			return late(Stopped, nacked, msgs[i:])
		case <-expired:
			return late(TimedOut, nacked, msgs[i:])
		}
	}
	if nacked {
		return Nacked
	}
	return Acked
}

// late is Await's outcome once stop or the timeout came while rest were
// still awaited: theirs if they all turn out settled, else o.
func late(o Outcome, nacked bool, rest []*message.Message) Outcome {
	for _, msg := range rest {
		select {
		case <-msg.Acked():
		case <-msg.Nacked():
			nacked = true
		default:
			return o
		}
	}
	if nacked {
		return Nacked
	}
	return Acked
}

// Hold waits d, or less if stop closes first; it reports whether the
// whole d passed.
func Hold(stop <-chan struct{}, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-stop:
		return false
	}
}

// Flight tracks one subscription's work in flight (messages being handed
// out, deliveries being settled), so that its output channel is closed
// only once nothing can send on it or settle through it any more: the
// race watermill-nats' subscriber has (watermill-nats PR #18), where the
// channel is closed while a consume callback still sends on it.
type Flight struct {
	stop chan struct{}

	mu       sync.RWMutex // orders every Enter before Stop's Wait
	stopped  bool
	inflight sync.WaitGroup
}

// Start returns the Flight of a subscription that stops when ctx ends or
// closing closes.
func Start(ctx context.Context, closing <-chan struct{}) *Flight {
	f := &Flight{stop: make(chan struct{})}
	go func() {
		select {
		case <-ctx.Done():
		case <-closing:
		case <-f.stop: // stopped by hand
		}
		f.Stop()
	}()
	return f
}

// Stopping is closed once the subscription stops.
func (f *Flight) Stopping() <-chan struct{} { return f.stop }

// Stop stops the subscription: Enter refuses from now on, and Stopping
// closes. It does not wait; Wait does.
func (f *Flight) Stop() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.stopped {
		f.stopped = true
		close(f.stop)
	}
}

// Enter counts one piece of work in flight, unless the subscription has
// stopped; each Enter that returns true needs its Leave.
func (f *Flight) Enter() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.stopped {
		return false
	}
	f.inflight.Add(1)
	return true
}

// Leave ends what Enter counted.
func (f *Flight) Leave() { f.inflight.Done() }

// Wait returns once the subscription has stopped and all work in flight
// has left.
func (f *Flight) Wait() {
	<-f.stop
	f.inflight.Wait()
}

// Settle waits, in a goroutine counted in flight, for msgs (one broker
// delivery) to be settled or to time out after t.AckTimeout, and hands
// the outcome to then, which acks or requeues the delivery at its broker
// (for Nacked after t.NackDelay: see Hold). cancel, which ends the
// messages' context, is called once then returns, so a handler learns its
// message was settled, abandoned or handed back. If the subscription has
// already stopped, then gets Stopped at once, in this goroutine. Call it
// before the messages are handed out: one that is never handed out (the
// subscription stopped first) is then handed back with the rest.
func (f *Flight) Settle(cancel context.CancelFunc, t Timing, msgs []*message.Message, then func(Outcome)) {
	if !f.Enter() {
		then(Stopped)
		cancel()
		return
	}
	go func() {
		defer f.Leave()
		defer cancel()
		then(Await(f.stop, t.AckTimeout, msgs...))
	}()
}
