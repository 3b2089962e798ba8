package settle

import (
	"context"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// within fails the test unless ch yields before the deadline.
func within[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: nothing within 5s", what)
		var zero T
		return zero
	}
}

func msgs(n int) []*message.Message {
	out := make([]*message.Message, n)
	for i := range out {
		out[i] = message.NewMessage(string(rune('a'+i)), nil)
	}
	return out
}

// TestAwait: the outcome of one delivery of one or more messages.
func TestAwait(t *testing.T) {
	tests := []struct {
		name    string
		n       int
		act     func(ms []*message.Message, stop chan struct{})
		timeout time.Duration
		want    Outcome
	}{
		{"ack", 1, func(ms []*message.Message, _ chan struct{}) { ms[0].Ack() }, 0, Acked},
		{"nack", 1, func(ms []*message.Message, _ chan struct{}) { ms[0].Nack() }, 0, Nacked},
		{"batch all acked", 3, func(ms []*message.Message, _ chan struct{}) {
			for _, m := range ms {
				m.Ack()
			}
		}, 0, Acked},
		{"batch one nacked", 3, func(ms []*message.Message, _ chan struct{}) { ms[0].Ack(); ms[1].Nack(); ms[2].Ack() }, 0, Nacked},
		{"timeout", 2, func(ms []*message.Message, _ chan struct{}) { ms[0].Ack() }, 20 * time.Millisecond, TimedOut},
		{"stopped in flight", 2, func(ms []*message.Message, stop chan struct{}) { ms[0].Ack(); close(stop) }, 0, Stopped},
		{"settled before the stop counts as settled", 2, func(ms []*message.Message, stop chan struct{}) {
			ms[0].Ack()
			ms[1].Nack()
			close(stop)
		}, 0, Nacked},
		{"acked before the timeout counts as acked", 1, func(ms []*message.Message, _ chan struct{}) { ms[0].Ack() }, time.Nanosecond, Acked},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ms, stop := msgs(tt.n), make(chan struct{})
			tt.act(ms, stop)
			if got := Await(stop, tt.timeout, ms...); got != tt.want {
				t.Fatalf("Await = %s, want %s", got, tt.want)
			}
		})
	}
}

// TestAwaitWaitsForTheWholeBatch: a nack does not end the wait while
// other messages of the delivery are still being handled, so they are not
// redelivered under a handler still working on them.
func TestAwaitWaitsForTheWholeBatch(t *testing.T) {
	ms := msgs(2)
	done := make(chan Outcome, 1)
	go func() { done <- Await(nil, 0, ms...) }()
	ms[0].Nack()
	select {
	case o := <-done:
		t.Fatalf("Await returned %s with a message unsettled", o)
	case <-time.After(50 * time.Millisecond):
	}
	ms[1].Ack()
	if o := within(t, "outcome", done); o != Nacked {
		t.Fatalf("Await = %s, want nacked", o)
	}
}

// TestSettle: what then is told, and that the messages' context ends once
// then returns, for each way a delivery ends, including a nack held for
// its redelivery delay.
func TestSettle(t *testing.T) {
	timing := Timing{NackDelay: 30 * time.Millisecond, AckTimeout: time.Minute}
	tests := []struct {
		name string
		t    Timing
		act  func(m *message.Message, f *Flight)
		want Outcome
	}{
		{"ack", timing, func(m *message.Message, _ *Flight) { m.Ack() }, Acked},
		{"nack", timing, func(m *message.Message, _ *Flight) { m.Nack() }, Nacked},
		{"timeout", Timing{AckTimeout: 20 * time.Millisecond}, func(*message.Message, *Flight) {}, TimedOut},
		{"close while in flight", timing, func(_ *message.Message, f *Flight) { f.Stop() }, Stopped},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := Start(context.Background(), nil)
			defer f.Stop()
			ms := msgs(1)
			ctx, cancel := context.WithCancel(context.Background())
			ms[0].SetContext(ctx)
			type result struct {
				o       Outcome
				held    time.Duration
				ctxOpen bool
			}
			got := make(chan result, 1)
			f.Settle(cancel, tt.t, ms, func(o Outcome) {
				r := result{o: o, ctxOpen: ctx.Err() == nil}
				if o == Nacked {
					start := time.Now()
					if !Hold(f.Stopping(), tt.t.NackDelay) {
						t.Error("Hold ended early without a stop")
					}
					r.held = time.Since(start)
				}
				got <- r
			})
			tt.act(ms[0], f)
			r := within(t, "outcome", got)
			if r.o != tt.want {
				t.Fatalf("outcome %s, want %s", r.o, tt.want)
			}
			if !r.ctxOpen {
				t.Fatal("the message's context ended before then ran")
			}
			if tt.want == Nacked && r.held < tt.t.NackDelay {
				t.Fatalf("nack held %s, want at least %s", r.held, tt.t.NackDelay)
			}
			within(t, "message context to end", ctx.Done())
		})
	}
}

// TestDrainOnClose: a subscription stopped with deliveries in flight hands
// each back (Stopped) at once, even one waiting out its nack delay, ends
// their contexts, and Wait returns only after every then has returned.
// A delivery settled after the stop is Stopped without a goroutine.
func TestDrainOnClose(t *testing.T) {
	closing := make(chan struct{})
	f := Start(context.Background(), closing)
	const n = 5
	outcomes := make(chan Outcome, n+1)
	var ctxs []context.Context
	for i := range n {
		ms := msgs(1)
		ctx, cancel := context.WithCancel(context.Background())
		ctxs = append(ctxs, ctx)
		ms[0].SetContext(ctx)
		f.Settle(cancel, Timing{NackDelay: time.Hour}, ms, func(o Outcome) {
			if o == Nacked && !Hold(f.Stopping(), time.Hour) {
				o = Stopped
			}
			outcomes <- o
		})
		if i == 0 {
			ms[0].Nack() // waits out its nack delay when the close comes
		}
	}
	close(closing)
	waited := make(chan struct{})
	go func() { f.Wait(); close(waited) }()
	within(t, "Wait after close", waited)
	for range n {
		if o := within(t, "outcome", outcomes); o != Stopped {
			t.Fatalf("in-flight delivery %s at close, want stopped", o)
		}
	}
	for i, ctx := range ctxs {
		if ctx.Err() == nil {
			t.Fatalf("message %d's context still open after the drain", i)
		}
	}

	ctx, cancel := context.WithCancel(context.Background())
	f.Settle(cancel, Timing{}, msgs(1), func(o Outcome) { outcomes <- o })
	if o := <-outcomes; o != Stopped {
		t.Fatalf("delivery after the stop: %s, want stopped", o)
	}
	if ctx.Err() == nil {
		t.Fatal("context of a delivery after the stop still open")
	}
	if f.Enter() {
		t.Fatal("Enter accepted work after the stop")
	}
}

// TestStartStopsWithContext: the subscription's context ending stops it
// as Close does.
func TestStartStopsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	f := Start(ctx, nil)
	if !f.Enter() {
		t.Fatal("Enter refused before the stop")
	}
	cancel()
	within(t, "stop on context end", f.Stopping())
	waited := make(chan struct{})
	go func() { f.Wait(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("Wait returned with work in flight")
	case <-time.After(20 * time.Millisecond):
	}
	f.Leave()
	within(t, "Wait after Leave", waited)
}

func TestNextBackoff(t *testing.T) {
	timing := DefaultTiming()
	var got []time.Duration
	for b := time.Duration(0); len(got) < 8; {
		b = timing.NextBackoff(b)
		got = append(got, b)
	}
	want := []time.Duration{100, 200, 400, 800, 1600, 3200, 5000, 5000}
	for i := range want {
		if got[i] != want[i]*time.Millisecond {
			t.Fatalf("backoffs %v, want %v ms", got, want)
		}
	}
}
