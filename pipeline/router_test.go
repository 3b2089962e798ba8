package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"imcloud/proto/pb"
)

const maxRetries = 3

// liveContextStore fails the test when the store is called with a context
// that is already done, as a network store would fail.
type liveContextStore struct {
	t *testing.T
	DedupeStore
}

func (s liveContextStore) Delivered(ctx context.Context, id string) (bool, error) {
	if ctx.Err() != nil {
		s.t.Errorf("Delivered(%s) called with a done context: %v", id, ctx.Err())
	}
	return s.DedupeStore.Delivered(ctx, id)
}

func (s liveContextStore) MarkDelivered(ctx context.Context, id string, ttl time.Duration) error {
	if ctx.Err() != nil {
		s.t.Errorf("MarkDelivered(%s) called with a done context: %v", id, ctx.Err())
	}
	return s.DedupeStore.MarkDelivered(ctx, id, ttl)
}

// attempts counts handler runs per message id.
type attempts struct {
	mu sync.Mutex
	n  map[string]int
}

func (a *attempts) add(id string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.n[id]++
	return a.n[id]
}

func (a *attempts) get(id string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.n[id]
}

// mapDedupe is a DedupeStore in a map that never forgets. The tests do not
// use adapters/memory's, which imports pipeline (its History) and so would
// be an import cycle here.
type mapDedupe struct {
	mu  sync.Mutex
	ids map[string]bool
}

func (d *mapDedupe) Delivered(_ context.Context, id string) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ids[id], nil
}

func (d *mapDedupe) MarkDelivered(_ context.Context, id string, _ time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ids[id] = true
	return nil
}

// runRouter runs a router with the production middleware stack around
// handler. Publishing blocks until the message is acked, so a publish
// returning means the stack is done with the message.
func runRouter(t *testing.T, handler func(msg *message.Message, attempt int) error) (pub func(id string) error, poisoned <-chan *message.Message, tries *attempts) {
	t.Helper()
	return runRouterWith(t, slog.New(slog.DiscardHandler), holdTiming{first: configHoldFirst, max: configHoldMax, total: 30 * time.Second}, handler)
}

// runRouterWith is runRouter with logger and holdConfigFault's timing.
func runRouterWith(t *testing.T, logger *slog.Logger, hold holdTiming, handler func(msg *message.Message, attempt int) error) (pub func(id string) error, poisoned <-chan *message.Message, tries *attempts) {
	t.Helper()
	publish, poisoned, tries := startRouter(t, logger, hold, handler)
	return func(id string) error {
		msg, err := NewPushMessage(id, "corr-"+id, &pb.PushMsg{Operation: 1000})
		if err != nil {
			return err
		}
		return publish(msg)
	}, poisoned, tries
}

// startRouter runs the production middleware stack around handler on the
// "push" topic; publish returns once the stack acked (or nacked) msg.
func startRouter(t *testing.T, logger *slog.Logger, hold holdTiming, handler func(msg *message.Message, attempt int) error) (publish func(msg *message.Message) error, poisoned <-chan *message.Message, tries *attempts) {
	return startRouterStarting(t, logger, hold, handler, nil)
}

// startRouterStarting is startRouter with a Starter made by starter from
// the handler (each call counted in tries) and an in-process dedupe
// store, so that bundles' first tries are started in turn (tryAll).
func startRouterStarting(t *testing.T, logger *slog.Logger, hold holdTiming, handler func(msg *message.Message, attempt int) error, starter func(h message.NoPublishHandlerFunc, tries *attempts) Starter) (publish func(msg *message.Message) error, poisoned <-chan *message.Message, tries *attempts) {
	t.Helper()
	pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, WatermillLogger(logger))
	t.Cleanup(func() { _ = pubsub.Close() })
	cfg := RouterConfig{Timeout: 5 * time.Second, MaxRetries: maxRetries, InitialInterval: time.Millisecond, MaxInterval: 5 * time.Millisecond, Multiplier: 2, DedupeTTL: 10 * time.Minute}
	var store DedupeStore = liveContextStore{t, &mapDedupe{ids: map[string]bool{}}}
	if starter != nil {
		store = inProcessStore{store.(liveContextStore)}
	}
	r, err := newRouter(cfg, "poison", pubsub, store, logger, hold)
	if err != nil {
		t.Fatal(err)
	}
	tries = &attempts{n: map[string]int{}}
	h := func(msg *message.Message) error {
		return handler(msg, tries.add(msg.Metadata.Get(MetaMessageID)))
	}
	var start Starter
	if starter != nil {
		start = starter(h, tries)
	}
	r.AddStartingConsumer("h", "push", pubsub, h, start)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	poison, err := pubsub.Subscribe(ctx, "poison")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = r.Run(ctx) }()
	<-r.Running()
	t.Cleanup(func() { _ = r.Close() })
	return func(msg *message.Message) error { return pubsub.Publish("push", msg) }, poison, tries
}

// inBackground runs fn (a publish that waits for the test to ack a poisoned
// message) and returns its error channel.
func inBackground(fn func() error) <-chan error {
	done := make(chan error, 1)
	go func() { done <- fn() }()
	return done
}

func TestFailingHandlerIsRetriedThenPoisoned(t *testing.T) {
	for _, panics := range []bool{false, true} {
		t.Run(fmt.Sprintf("panics=%v", panics), func(t *testing.T) {
			publish, poisoned, tries := runRouter(t, func(*message.Message, int) error {
				if panics {
					panic("boom")
				}
				return errors.New("cloud unreachable")
			})
			published := inBackground(func() error { return publish("id-1") })
			select {
			case p := <-poisoned:
				p.Ack()
				if err := <-published; err != nil {
					t.Fatal(err)
				}
				if got := tries.get("id-1"); got != maxRetries+1 {
					t.Fatalf("handler ran %d times before poisoning, want %d", got, maxRetries+1)
				}
				if p.Metadata.Get(middleware.ReasonForPoisonedKey) == "" || p.Metadata.Get(MetaMessageID) != "id-1" {
					t.Fatalf("poisoned message metadata %v lacks reason or id", p.Metadata)
				}
				if middleware.MessageCorrelationID(p) != "corr-id-1" {
					t.Fatalf("correlation id %q, want corr-id-1", middleware.MessageCorrelationID(p))
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("nothing poisoned after %d attempts", tries.get("id-1"))
			}
		})
	}
}

func TestDedupe(t *testing.T) {
	var mu sync.Mutex
	delivered := map[string]int{}
	failUntil := map[string]int{"flaky": 3, "poisoned-once": maxRetries + 1}
	publish, poisoned, tries := runRouter(t, func(msg *message.Message, attempt int) error {
		id := msg.Metadata.Get(MetaMessageID)
		mu.Lock()
		defer mu.Unlock()
		if attempt <= failUntil[id] {
			return fmt.Errorf("attempt %d fails", attempt)
		}
		delivered[id]++
		return nil
	})
	count := func(id string) int {
		mu.Lock()
		defer mu.Unlock()
		return delivered[id]
	}

	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// A failure that retries fix is delivered, not taken for a duplicate.
	must(publish("flaky"))
	if count("flaky") != 1 || tries.get("flaky") != 4 {
		t.Fatalf("flaky: delivered %d times in %d attempts, want once in 4", count("flaky"), tries.get("flaky"))
	}

	// The same id again is dropped without running the handler.
	must(publish("flaky"))
	must(publish("once"))
	must(publish("once"))
	if count("once") != 1 || tries.get("once") != 1 || tries.get("flaky") != 4 {
		t.Fatalf("duplicates ran the handler: once %d/%d tries, flaky %d tries", count("once"), tries.get("once"), tries.get("flaky"))
	}

	// A poisoned message was never delivered, so its replay is delivered.
	published := inBackground(func() error { return publish("poisoned-once") })
	select {
	case p := <-poisoned:
		p.Ack()
		must(<-published)
	case <-time.After(10 * time.Second):
		t.Fatal("not poisoned")
	}
	must(publish("poisoned-once"))
	if count("poisoned-once") != 1 {
		t.Fatalf("replayed poisoned message delivered %d times, want 1", count("poisoned-once"))
	}
}

func TestMidKeysRoundTrip(t *testing.T) {
	msg, err := NewPushMessage("id", "c", &pb.PushMsg{})
	if err != nil {
		t.Fatal(err)
	}
	byMid := map[int64]map[string]string{
		7: {"b": "c1", "a": "c2"}, // a key of this message: recorded with all its keys
		8: {"z": "c3"},            // none here: left out
	}
	SetMidKeys(msg, []string{"b"}, byMid)
	got, err := MidKeys(msg)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != "map[7:[a b]]" {
		t.Fatalf("MidKeys = %v, want map[7:[a b]]", got)
	}
	plain, _ := NewPushMessage("id2", "c", &pb.PushMsg{})
	SetMidKeys(plain, []string{"k"}, nil)
	if got, err := MidKeys(plain); err != nil || got != nil {
		t.Fatalf("a key push has mid keys %v (%v)", got, err)
	}
}
