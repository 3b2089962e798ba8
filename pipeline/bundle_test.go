package pipeline

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
)

// gatePublisher records what reaches the broker; while gate is set, each
// Publish call waits for it to close.
type gatePublisher struct {
	mu      sync.Mutex
	calls   [][]*message.Message
	gate    chan struct{}
	entered chan struct{}
	fail    error
	// atGate counts the messages (a bundle as those it carries) of the
	// publishes waiting at the gate.
	atGate int
}

func (g *gatePublisher) Publish(_ string, msgs ...*message.Message) error {
	g.mu.Lock()
	gate := g.gate
	if gate != nil {
		for _, m := range msgs {
			n, _ := strconv.Atoi(m.Metadata.Get(MetaBundle)) // 0: no bundle
			g.atGate += max(n, 1)
		}
	}
	g.mu.Unlock()
	if gate != nil {
		g.entered <- struct{}{}
		<-gate
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.fail != nil {
		return g.fail
	}
	g.calls = append(g.calls, msgs)
	return nil
}

func (g *gatePublisher) Close() error { return nil }

// received returns the ids that reached the broker, bundles opened, and
// how many broker messages carried them.
func (g *gatePublisher) received(t *testing.T) (ids []string, brokerMsgs int) {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, call := range g.calls {
		for _, m := range call {
			brokerMsgs++
			inner, err := Unbundle(m)
			if err != nil {
				t.Fatal(err)
			}
			for _, in := range inner {
				ids = append(ids, in.UUID)
			}
		}
	}
	return ids, brokerMsgs
}

func testMsg(id string, size int) *message.Message {
	m := message.NewMessage(id, make([]byte, size))
	m.Metadata.Set(MetaMessageID, id)
	m.SetContext(context.Background())
	return m
}

// TestBundlerAloneIsUnchanged: a publish that finds no other reaches the
// broker as the very message it was.
func TestBundlerAloneIsUnchanged(t *testing.T) {
	g := &gatePublisher{}
	b := NewBundler(g)
	m := testMsg("a", 10)
	if err := b.Publish("t", m); err != nil {
		t.Fatal(err)
	}
	if len(g.calls) != 1 || len(g.calls[0]) != 1 || g.calls[0][0] != m {
		t.Fatalf("broker got %v, want the message itself", g.calls)
	}
}

// TestBundlerGathersWhatWaits: publishes that arrive while every sender
// is out travel in one bundle when one comes back, each caller's messages
// together and in order, and every caller learns its bundle's outcome.
func TestBundlerGathersWhatWaits(t *testing.T) {
	for _, fail := range []error{nil, errors.New("broker down")} {
		t.Run(fmt.Sprint("fail=", fail), func(t *testing.T) {
			g := &gatePublisher{gate: make(chan struct{}), entered: make(chan struct{}, 100), fail: fail}
			b := NewBundler(g)
			errs := make(chan error, 100)
			// Occupy every sender.
			for i := range bundleSenders {
				go func() { errs <- b.Publish("t", testMsg(fmt.Sprint("busy", i), 10)) }()
				<-g.entered
			}
			// These wait: 20 calls of 3 messages each.
			var want []string
			var queued sync.WaitGroup
			for i := range 20 {
				ids := []string{fmt.Sprint("c", i, ".0"), fmt.Sprint("c", i, ".1"), fmt.Sprint("c", i, ".2")}
				want = append(want, ids...)
				queued.Go(func() {
					errs <- b.Publish("t", testMsg(ids[0], 10), testMsg(ids[1], 10), testMsg(ids[2], 10))
				})
			}
			// Every waiting call is queued once the bundler's queue holds
			// them all; the senders are all stuck in the gate.
			deadline := time.Now().Add(5 * time.Second)
			for queuedCalls(b, "t") < 20 {
				if time.Now().After(deadline) {
					t.Fatalf("%d calls queued, want 20", queuedCalls(b, "t"))
				}
				time.Sleep(time.Millisecond)
			}
			g.mu.Lock()
			close(g.gate)
			g.gate = nil
			g.mu.Unlock()
			queued.Wait()
			for range bundleSenders + 20 {
				if err := <-errs; !errors.Is(err, fail) {
					t.Fatalf("a caller got %v, want %v", err, fail)
				}
			}
			if fail != nil {
				return
			}
			ids, brokerMsgs := g.received(t)
			var got []string
			for _, id := range ids {
				if strings.HasPrefix(id, "c") {
					got = append(got, id)
				}
			}
			slices.Sort(got)
			sorted := slices.Sorted(slices.Values(want))
			if !slices.Equal(got, sorted) {
				t.Fatalf("the broker got %v, want %v", got, sorted)
			}
			// 60 waiting messages fit one bundle: one sender coming back
			// takes them all.
			if brokerMsgs != bundleSenders+1 {
				t.Fatalf("%d broker messages, want %d alone and one bundle", brokerMsgs, bundleSenders)
			}
			// Each call's three messages sit together, in order.
			for i, id := range ids {
				if strings.HasSuffix(id, ".0") && (ids[i+1] != strings.TrimSuffix(id, "0")+"1" || ids[i+2] != strings.TrimSuffix(id, "0")+"2") {
					t.Fatalf("a call's messages apart or out of order: %v", ids)
				}
			}
		})
	}
}

func queuedCalls(b *Bundler, topic string) int {
	b.mu.Lock()
	q := b.topics[topic]
	b.mu.Unlock()
	if q == nil {
		return 0
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.calls)
}

// TestBundleLimits: one call of more messages or bytes than a bundle
// holds goes in several bundles of one broker call; a message over the
// byte limit goes alone.
func TestBundleLimits(t *testing.T) {
	g := &gatePublisher{}
	b := NewBundler(g)
	var msgs []*message.Message
	for i := range 2*MaxBundle + 10 {
		msgs = append(msgs, testMsg(fmt.Sprint(i), 100))
	}
	big := testMsg("big", MaxBundleBytes+1)
	msgs = append(msgs, big, testMsg("after", 100))
	if err := b.Publish("t", msgs...); err != nil {
		t.Fatal(err)
	}
	if len(g.calls) != 1 {
		t.Fatalf("%d broker calls, want 1", len(g.calls))
	}
	var sizes []int
	for _, m := range g.calls[0] {
		inner, err := Unbundle(m)
		if err != nil {
			t.Fatal(err)
		}
		sizes = append(sizes, len(inner))
		if len(m.Payload) > MaxBundleBytes+1024 {
			t.Fatalf("a broker message of %d bytes", len(m.Payload))
		}
	}
	if !slices.Equal(sizes, []int{MaxBundle, MaxBundle, 10, 1, 1}) {
		t.Fatalf("bundles of %v messages", sizes)
	}
	if g.calls[0][3] != big {
		t.Fatal("the message over the byte limit was not sent alone as itself")
	}
	ids, _ := g.received(t)
	for i := range 2*MaxBundle + 10 {
		if ids[i] != fmt.Sprint(i) {
			t.Fatalf("message %d is %s: out of order", i, ids[i])
		}
	}
}

// TestBundleContextHasTheLatestDeadline: one caller's deadline does not
// cut the others' publish short.
func TestBundleContextHasTheLatestDeadline(t *testing.T) {
	g := &gatePublisher{}
	b := NewBundler(g)
	soon, cancel1 := context.WithTimeout(context.Background(), time.Minute)
	defer cancel1()
	late, cancel2 := context.WithTimeout(context.Background(), time.Hour)
	defer cancel2()
	m1, m2 := testMsg("1", 1), testMsg("2", 1)
	m1.SetContext(soon)
	m2.SetContext(late)
	if err := b.Publish("t", m1, m2); err != nil {
		t.Fatal(err)
	}
	d, ok := g.calls[0][0].Context().Deadline()
	if want, _ := late.Deadline(); !ok || !d.Equal(want) {
		t.Fatalf("bundle deadline %v, want %v", d, want)
	}
}

// TestUnbundledMessagesSettleAlone: the router runs each message of a
// bundle down the middleware on its own: a duplicate is dropped, a
// failing one is retried and poisoned alone (as itself, not the bundle),
// the others are delivered, and the bundle is acked once all are settled.
// A bundle that does not decode is poisoned as it is.
func TestUnbundledMessagesSettleAlone(t *testing.T) {
	var mu sync.Mutex
	delivered := map[string]int{}
	publish, poisoned, tries := startRouter(t, slog.New(slog.DiscardHandler), holdTiming{first: configHoldFirst, max: configHoldMax, total: time.Second},
		func(msg *message.Message, _ int) error {
			id := msg.Metadata.Get(MetaMessageID)
			if id == "bad" {
				return errors.New("cloud unreachable")
			}
			if _, err := DecodePush(msg); err != nil {
				return err
			}
			mu.Lock()
			delivered[id]++
			mu.Unlock()
			return nil
		})
	push := func(id string) *message.Message { return testPush(t, id) }
	if err := publish(push("seen")); err != nil {
		t.Fatal(err)
	}
	bundle, err := NewBundle([]*message.Message{push("a"), push("seen"), push("bad"), push("b")})
	if err != nil {
		t.Fatal(err)
	}
	done := inBackground(func() error { return publish(bundle) })
	select {
	case p := <-poisoned:
		if p.Metadata.Get(MetaMessageID) != "bad" || p.Metadata.Get(MetaBundle) != "" || middleware.MessageCorrelationID(p) != "corr-bad" {
			t.Fatalf("poisoned %v, want the failing message alone", p.Metadata)
		}
		p.Ack()
	case <-time.After(10 * time.Second):
		t.Fatal("nothing poisoned")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	got := fmt.Sprint(delivered)
	mu.Unlock()
	if got != "map[a:1 b:1 seen:1]" || tries.get("bad") != maxRetries+1 || tries.get("seen") != 1 {
		t.Fatalf("delivered %s, bad tried %d times, seen %d; want a, b and seen once, bad %d times",
			got, tries.get("bad"), tries.get("seen"), maxRetries+1)
	}

	corrupt := message.NewMessage("corrupt", []byte{0xff, 0xff})
	corrupt.Metadata.Set(MetaMessageID, "corrupt")
	corrupt.Metadata.Set(MetaBundle, "2")
	done = inBackground(func() error { return publish(corrupt) })
	select {
	case p := <-poisoned:
		if p.UUID != "corrupt" {
			t.Fatalf("poisoned %s, want the corrupt bundle", p.UUID)
		}
		p.Ack()
	case <-time.After(10 * time.Second):
		t.Fatal("corrupt bundle not poisoned")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// panicPublisher panics on every publish.
type panicPublisher struct{}

func (panicPublisher) Publish(string, ...*message.Message) error { panic("adapter bug") }
func (panicPublisher) Close() error                              { return nil }

// TestBundlerSurvivesAPanickingBroker: a panic in the broker's Publish
// reaches its callers as an error, and frees the sender: later publishes
// are answered too, not left waiting.
func TestBundlerSurvivesAPanickingBroker(t *testing.T) {
	b := NewBundler(panicPublisher{})
	for i := range 2 * bundleSenders {
		if err := b.Publish("t", testMsg(fmt.Sprint(i), 1)); err == nil || !strings.Contains(err.Error(), "panicked") {
			t.Fatalf("publish %d: %v, want the panic as an error", i, err)
		}
	}
}

// TestBundlerCallerLeavesAfterItsOwn: the caller that sends returns once
// its own messages are out, though others keep arriving; they are sent
// by a sender of their own.
func TestBundlerCallerLeavesAfterItsOwn(t *testing.T) {
	g := &gatePublisher{gate: make(chan struct{}), entered: make(chan struct{}, 1000)}
	b := NewBundler(g)
	first := inBackground(func() error { return b.Publish("t", testMsg("first", 1)) })
	<-g.entered
	// More arrive while the first is out, and keep arriving: each call
	// waits in the queue or rides a bundle the other senders took (how
	// many each takes depends on when it started).
	var others sync.WaitGroup
	for i := range 8 {
		others.Go(func() { _ = b.Publish("t", testMsg(fmt.Sprint("o", i), 1)) })
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		g.mu.Lock()
		atGate := g.atGate
		g.mu.Unlock()
		if atGate+queuedCalls(b, "t") == 9 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d calls queued, %d messages at the broker's gate, want 9 in all", queuedCalls(b, "t"), atGate)
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	g.mu.Lock()
	close(g.gate)
	g.gate = nil
	g.mu.Unlock()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	others.Wait()
	ids, _ := g.received(t)
	if len(ids) != 9 {
		t.Fatalf("the broker got %v", ids)
	}
}

// TestBundleSizeCountsMetadata: a bundle's byte limit counts each
// message's metadata, which can be as large as its payload (a mid push's
// mid_keys), so no bundle body is much over MaxBundleBytes.
func TestBundleSizeCountsMetadata(t *testing.T) {
	g := &gatePublisher{}
	b := NewBundler(g)
	var msgs []*message.Message
	for i := range 200 {
		m := testMsg(fmt.Sprint(i), 2000)
		m.Metadata.Set(MetaMidKeys, strings.Repeat("k", 2000))
		msgs = append(msgs, m)
	}
	if err := b.Publish("t", msgs...); err != nil {
		t.Fatal(err)
	}
	for _, m := range g.calls[0] {
		if len(m.Payload) > MaxBundleBytes+4096 {
			t.Fatalf("a bundle body of %d bytes, limit %d", len(m.Payload), MaxBundleBytes)
		}
	}
	if len(g.calls[0]) < 2 {
		t.Fatalf("800 KB of messages in %d bundle", len(g.calls[0]))
	}
}

// TestBundledFirstTry: a bundled message's first try goes straight to the
// handler; one that fails or panics there is retried through the stack
// (and delivered once, in no more attempts than before), one that
// succeeds is marked delivered, so the same bundle again is dropped whole
// as duplicates.
func TestBundledFirstTry(t *testing.T) {
	var mu sync.Mutex
	delivered := map[string]int{}
	publish, poisoned, tries := startRouter(t, slog.New(slog.DiscardHandler), holdTiming{first: configHoldFirst, max: configHoldMax, total: time.Second},
		firstTryHandler(&mu, delivered, "panicky"))
	publishRounds(t, publish, poisoned, "ok", "flaky", "panicky", "never")
	mu.Lock()
	got := fmt.Sprint(delivered)
	mu.Unlock()
	if got != "map[flaky:1 ok:1 panicky:1]" {
		t.Fatalf("delivered %s, want each once", got)
	}
	// The try is the first attempt: never was tried max_retries + 1 times
	// a round, as without bundles.
	if tries.get("ok") != 1 || tries.get("flaky") != 2 || tries.get("panicky") != 2 || tries.get("never") != 2*(maxRetries+1) {
		t.Fatalf("tries ok %d flaky %d panicky %d never %d, want 1, 2, 2, %d",
			tries.get("ok"), tries.get("flaky"), tries.get("panicky"), tries.get("never"), 2*(maxRetries+1))
	}
}

// testPush is a push message with id, correlation id "corr-" and id.
func testPush(t *testing.T, id string) *message.Message {
	t.Helper()
	m, err := NewPushMessage(id, "corr-"+id, &pb.PushMsg{Operation: 1000})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestUnbundleReadsBothMetadataForms: a bundle written before metadata
// was flattened (the envelope's map) still reads, as does the flat form
// NewBundle writes; a flat list with a key and no value drops the key.
func TestUnbundleReadsBothMetadataForms(t *testing.T) {
	old := &pb.Batch{Messages: []*pb.Envelope{
		{Uuid: "a", Metadata: map[string]string{MetaMessageID: "a", "k": "v"}, Payload: []byte("1")},
		{Uuid: "b", Meta: []string{MetaMessageID, "b", "k", "w", "dangling"}, Payload: []byte("2")},
		{Uuid: "c", Payload: []byte("3")},
	}}
	body, err := proto.Marshal(old)
	if err != nil {
		t.Fatal(err)
	}
	bundle := message.NewMessage("bundle", body)
	bundle.Metadata.Set(MetaBundle, "3")
	msgs, err := Unbundle(bundle)
	if err != nil || len(msgs) != 3 {
		t.Fatalf("unbundle: %d messages, %v", len(msgs), err)
	}
	want := []message.Metadata{{MetaMessageID: "a", "k": "v"}, {MetaMessageID: "b", "k": "w"}, {}}
	for i, m := range msgs {
		if !maps.Equal(m.Metadata, want[i]) || m.Metadata == nil {
			t.Errorf("message %d: metadata %v, want %v", i, m.Metadata, want[i])
		}
	}

	// What NewBundle writes round-trips.
	in := []*message.Message{message.NewMessage("x", []byte("p")), message.NewMessage("y", []byte("q"))}
	in[0].Metadata.Set("one", "1")
	in[1].Metadata.Set("two", "2")
	in[1].Metadata.Set("three", "3")
	b, err := NewBundle(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := Unbundle(b)
	if err != nil || len(out) != 2 || !maps.Equal(out[0].Metadata, in[0].Metadata) || !maps.Equal(out[1].Metadata, in[1].Metadata) {
		t.Fatalf("round trip: %v %v", out, err)
	}
}

// slowDedupe answers after delay, as a store under load does.
type slowDedupe struct{ delay time.Duration }

func (s slowDedupe) Delivered(ctx context.Context, _ string) (bool, error) {
	select {
	case <-time.After(s.delay): // the store's latency, simulated
		return false, nil
	case <-ctx.Done():
		return false, ctx.Err()
	}
}

func (slowDedupe) MarkDelivered(context.Context, string, time.Duration) error { return nil }

// TestFirstTryTimeout: a bundle's first tries share the bundle's
// job.timeout; one whose dedupe check took over a tenth of it gets a whole
// job.timeout of its own, as an attempt always had.
func TestFirstTryTimeout(t *testing.T) {
	const timeout = 400 * time.Millisecond
	for _, tc := range []struct {
		name   string
		delay  time.Duration
		shared bool
	}{
		{"a quick check shares the bundle's deadline", 0, true},
		{"a slow check gets a deadline of its own", timeout / 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &firstTry{store: slowDedupe{tc.delay}, ttl: time.Minute, timeout: timeout, observe: func(string) {}, logger: slog.New(slog.DiscardHandler)}
			attempt, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			bundleDeadline, _ := attempt.Deadline()
			msg := testPush(t, "timed")
			var got time.Time
			ok := f.try(msg, func(m *message.Message) ([]*message.Message, error) {
				got, _ = m.Context().Deadline()
				return nil, nil
			}, attempt)
			if !ok {
				t.Fatal("the try failed")
			}
			if tc.shared && !got.Equal(bundleDeadline) {
				t.Fatalf("deadline %s, want the bundle's %s", got, bundleDeadline)
			}
			if !tc.shared && got.Sub(bundleDeadline) < tc.delay/2 {
				t.Fatalf("deadline %s, only %s after the bundle's: want a whole job.timeout from after the check", got, got.Sub(bundleDeadline))
			}
			if msg.Context() != context.Background() {
				t.Fatalf("the message kept the attempt's context after the try: the retry stack would get it")
			}
		})
	}
}

// inProcessStore is liveContextStore marked InProcess, as the memory
// dedupe store is: a bundle's first tries are then started in turn.
type inProcessStore struct{ liveContextStore }

func (inProcessStore) InProcess() {}

// TestBundledFirstTriesStarted: with a Starter and an in-process dedupe
// store, a bundle's first tries start one after another on the bundle's
// goroutine and are then waited for; each is still deduplicated, retried
// down the stack when its start or its wait fails or panics, poisoned
// after its retries, and delivered once — as with a goroutine per push
// (TestBundledFirstTry).
func TestBundledFirstTriesStarted(t *testing.T) {
	var mu sync.Mutex
	delivered := map[string]int{}
	started := map[string]int{}
	publish, poisoned, tries := startRouterStarting(t, slog.New(slog.DiscardHandler), holdTiming{first: configHoldFirst, max: configHoldMax, total: time.Second},
		firstTryHandler(&mu, delivered, "panicky-wait"),
		func(h message.NoPublishHandlerFunc, tries *attempts) Starter {
			return func(msg *message.Message) func() error {
				id := msg.Metadata.Get(MetaMessageID)
				mu.Lock()
				started[id]++
				first := started[id] == 1
				mu.Unlock()
				if id == "panicky-start" && first {
					tries.add(id)
					panic("a bug in the start, once")
				}
				return func() error { return h(msg) }
			}
		})
	publishRounds(t, publish, poisoned, "ok", "flaky", "panicky-start", "panicky-wait", "never")
	mu.Lock()
	got := fmt.Sprint(delivered)
	mu.Unlock()
	if got != "map[flaky:1 ok:1 panicky-start:1 panicky-wait:1]" {
		t.Fatalf("delivered %s, want each once", got)
	}
	// Round 2 found the delivered ones done (dedupe) and started only
	// never; each try counts as the first attempt.
	if started["ok"] != 1 || started["never"] != 2 {
		t.Fatalf("started ok %d times, never %d: want 1 and 2", started["ok"], started["never"])
	}
	if tries.get("ok") != 1 || tries.get("flaky") != 2 || tries.get("panicky-start") != 2 || tries.get("panicky-wait") != 2 || tries.get("never") != 2*(maxRetries+1) {
		t.Fatalf("tries ok %d flaky %d panicky-start %d panicky-wait %d never %d, want 1, 2, 2, 2, %d",
			tries.get("ok"), tries.get("flaky"), tries.get("panicky-start"), tries.get("panicky-wait"), tries.get("never"), 2*(maxRetries+1))
	}
}

// firstTryHandler fails "flaky" once, panics on panicky once, always
// fails "never", and counts in delivered (under mu) what it delivers.
func firstTryHandler(mu *sync.Mutex, delivered map[string]int, panicky string) func(msg *message.Message, attempt int) error {
	return func(msg *message.Message, attempt int) error {
		id := msg.Metadata.Get(MetaMessageID)
		switch {
		case id == "flaky" && attempt == 1:
			return errors.New("cloud unreachable once")
		case id == panicky && attempt == 1:
			panic("a bug, once")
		case id == "never":
			return errors.New("cloud unreachable")
		}
		mu.Lock()
		delivered[id]++
		mu.Unlock()
		return nil
	}
}

// publishRounds publishes a bundle of ids twice, each time acking the
// poisoned "never" the bundle's publish waits for.
func publishRounds(t *testing.T, publish func(*message.Message) error, poisoned <-chan *message.Message, ids ...string) {
	t.Helper()
	for round := range 2 {
		msgs := make([]*message.Message, len(ids))
		for i, id := range ids {
			msgs[i] = testPush(t, id)
		}
		bundle, err := NewBundle(msgs)
		if err != nil {
			t.Fatal(err)
		}
		done := inBackground(func() error { return publish(bundle) })
		select {
		case p := <-poisoned:
			if p.Metadata.Get(MetaMessageID) != "never" {
				t.Fatalf("round %d: poisoned %v", round, p.Metadata)
			}
			p.Ack()
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: nothing poisoned", round)
		}
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
}
