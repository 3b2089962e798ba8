package events

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// recorder is a publisher that keeps what it is given; block, when set,
// holds every publish until closed.
type recorder struct {
	mu    sync.Mutex
	msgs  []*message.Message
	block chan struct{}
	err   error
}

func (r *recorder) Publish(_ string, msgs ...*message.Message) error {
	if r.block != nil {
		<-r.block
	}
	if r.err != nil {
		return r.err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, msgs...)
	return nil
}

func (r *recorder) Close() error { return nil }

func (r *recorder) events(t *testing.T) []Event {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]Event, 0, len(r.msgs))
	for _, m := range r.msgs {
		ev, err := Decode(m.Payload)
		if err != nil {
			t.Fatal(err)
		}
		if m.Metadata.Get(MetaKind) != string(ev.Kind) {
			t.Fatalf("metadata kind %q, event kind %q", m.Metadata.Get(MetaKind), ev.Kind)
		}
		out = append(out, ev)
	}
	return out
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestEmitterPublishesEnabledKindsInOrder(t *testing.T) {
	rec := &recorder{}
	e := New(Options{Publisher: rec, Topic: "ev", Kinds: []Kind{Connect, Disconnect, Acked}, Buffer: 16, Logger: quiet()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()

	e.Emit(Event{Kind: Connect, Mid: 1, Key: "k", Rooms: []string{"live://1"}})
	e.Emit(Event{Kind: Delivered, Mid: 1, Key: "k"}) // off
	e.Acked("n1", 1, "k", Position{Stream: "user:1", Epoch: "e", Pos: 7})
	e.Emit(Event{Kind: Disconnect, Mid: 1, Key: "k", Code: 1000})
	waitFor(t, "3 events", func() bool { return e.Sent() == 3 })
	cancel()
	<-done

	got := rec.events(t)
	want := []Kind{Connect, Acked, Disconnect}
	if len(got) != len(want) {
		t.Fatalf("got %d events, want %d", len(got), len(want))
	}
	for i, ev := range got {
		if ev.Kind != want[i] {
			t.Errorf("event %d kind %s, want %s", i, ev.Kind, want[i])
		}
		if ev.At.IsZero() {
			t.Errorf("event %d has no time", i)
		}
	}
	if p := got[1].Position; p == nil || *p != (Position{Stream: "user:1", Epoch: "e", Pos: 7}) || got[1].Node != "n1" {
		t.Errorf("acked event = %+v", got[1])
	}
}

// A stuck broker never blocks Emit: the buffer fills and the rest is
// dropped and counted.
func TestEmitterDropsWhenFull(t *testing.T) {
	rec := &recorder{block: make(chan struct{})}
	e := New(Options{Publisher: rec, Topic: "ev", Kinds: AllKinds(), Buffer: 4, Logger: quiet()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()

	start := time.Now()
	for i := range 100 {
		e.Emit(Event{Kind: Delivered, Mid: int64(i)})
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("100 emits took %s with the broker stuck", d)
	}
	// One is held by the blocked publish, four buffered: at least 95 dropped.
	if n := e.Dropped(); n < 95 {
		t.Fatalf("dropped %d, want at least 95", n)
	}
	close(rec.block)
	cancel()
	<-done
	if got := e.Sent() + e.Dropped(); got != 100 {
		t.Fatalf("sent %d + dropped %d = %d, want 100", e.Sent(), e.Dropped(), got)
	}
}

func TestEmitterCountsRefusedPublishes(t *testing.T) {
	rec := &recorder{err: errors.New("queue full")}
	e := New(Options{Publisher: rec, Topic: "ev", Kinds: AllKinds(), Buffer: 4, Logger: quiet()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	e.Emit(Event{Kind: Offline, Mid: 3})
	waitFor(t, "the failure", func() bool { return e.Failed() == 1 })
	cancel()
	<-done
}

func TestNilEmitterIsOff(t *testing.T) {
	var e *Emitter
	e.Emit(Event{Kind: Connect})
	e.Acked("n", 1, "k", Position{})
	e.Run(context.Background())
	if e.Enabled(Connect) || e.Dropped() != 0 || e.Sent() != 0 || e.Failed() != 0 {
		t.Fatal("a nil emitter must do nothing")
	}
}

func TestParseKinds(t *testing.T) {
	tests := []struct {
		names   []string
		wantErr bool
	}{
		{names: []string{"connect", "acked"}},
		{names: []string{}},
		{names: []string{"connected"}, wantErr: true},
		{names: []string{"CONNECT"}, wantErr: true},
	}
	for _, tt := range tests {
		_, err := ParseKinds(tt.names)
		if (err != nil) != tt.wantErr {
			t.Errorf("ParseKinds(%q) err = %v, wantErr %v", tt.names, err, tt.wantErr)
		}
	}
}
