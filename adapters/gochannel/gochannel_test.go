package gochannel

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
)

func TestPendingMessagesAreBounded(t *testing.T) {
	const limit = 3
	p := New(watermill.NopLogger{}, limit, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs, err := p.Subscribe(ctx, "t")
	if err != nil {
		t.Fatal(err)
	}
	publish := func(i int) error { return p.Publish("t", message.NewMessage(fmt.Sprint(i), nil)) }
	// A topic nobody reads drops its messages at once: they hold nothing.
	for i := range 2 * limit {
		if err := p.Publish("nobody", message.NewMessage(fmt.Sprint(i), nil)); err != nil {
			t.Fatalf("publish to a topic without subscribers: %v", err)
		}
	}
	for i := range limit {
		if err := publish(i); err != nil {
			t.Fatalf("publish %d of %d: %v", i+1, limit, err)
		}
	}
	if err := publish(limit); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("publish past %d unacked messages: %v, want ErrQueueFull", limit, err)
	}
	// Acking one frees its slot.
	select {
	case m := <-msgs:
		m.Ack()
	case <-time.After(10 * time.Second):
		t.Fatal("no message delivered")
	}
	deadline := time.Now().Add(10 * time.Second)
	for publish(limit+1) != nil {
		if time.Now().After(deadline) {
			t.Fatal("an acked message did not free its slot")
		}
		time.Sleep(time.Millisecond)
	}
	if p.Pending() != limit {
		t.Fatalf("Pending() = %d, want %d", p.Pending(), limit)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := publish(99); err == nil {
		t.Fatal("publish after Close succeeded")
	}
}

// TestUnheardCounted: a message published to a topic without a subscriber
// is dropped, as Watermill does, but counted and reported; before, an op 4
// in standalone was answered op 5 and vanished without a trace.
func TestUnheardCounted(t *testing.T) {
	reported := map[string]int{}
	p := New(watermill.NopLogger{}, 10, func(topic string, msgs int) { reported[topic] += msgs })
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs, err := p.Subscribe(ctx, "heard")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Publish("unheard", message.NewMessage("1", nil), message.NewMessage("2", nil)); err != nil {
		t.Fatal(err)
	}
	if err := p.Publish("heard", message.NewMessage("3", nil)); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-msgs:
		m.Ack()
	case <-time.After(10 * time.Second):
		t.Fatal("subscriber got nothing")
	}
	if got := p.Unheard(); got != 2 {
		t.Fatalf("Unheard = %d, want 2", got)
	}
	if len(reported) != 1 || reported["unheard"] != 2 {
		t.Fatalf("reported %v, want unheard: 2", reported)
	}
}

// TestSubscriptionsShareTheQueue: two subscriptions to one topic share its
// messages (each message to one of them, none to both), each has up to
// subscriptionWindow out before acking any, and a nacked message comes
// again.
func TestSubscriptionsShareTheQueue(t *testing.T) {
	p := New(watermill.NopLogger{}, 10*subscriptionWindow, nil)
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	a, err := p.Subscribe(ctx, "t")
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Subscribe(ctx, "t")
	if err != nil {
		t.Fatal(err)
	}
	const n = 2 * subscriptionWindow
	for i := range n {
		if err := p.Publish("t", message.NewMessage(fmt.Sprint(i), nil)); err != nil {
			t.Fatal(err)
		}
	}
	// Nothing acked yet: each subscription hands out a window's worth.
	seen := map[string]int{}
	var held []*message.Message
	for _, sub := range []<-chan *message.Message{a, b} {
		for range subscriptionWindow {
			select {
			case m := <-sub:
				seen[m.UUID]++
				held = append(held, m)
			case <-time.After(10 * time.Second):
				t.Fatalf("a subscription handed out %d of its window unacked", len(held)%subscriptionWindow)
			}
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct messages of %d handed out: some went to both subscriptions", len(seen), n)
	}
	// A nacked message comes again (to either); the rest are acked.
	held[0].Nack()
	for _, m := range held[1:] {
		m.Ack()
	}
	var again *message.Message
	select {
	case again = <-a:
	case again = <-b:
	case <-time.After(10 * time.Second):
		t.Fatal("the nacked message did not come again")
	}
	if again.UUID != held[0].UUID {
		t.Fatalf("got %s again, want the nacked %s", again.UUID, held[0].UUID)
	}
	again.Ack()
	deadline := time.Now().Add(10 * time.Second)
	for p.Pending() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("Pending() = %d after every message was acked", p.Pending())
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
}

// TestLastSubscriptionEndsDropsWaiting: when a topic's last subscription
// ends, what waits for it is dropped and counted unheard (its slots
// freed), not kept where nothing reads it; a message nacked after its
// subscription ended goes to another subscription while there is one.
func TestLastSubscriptionEndsDropsWaiting(t *testing.T) {
	var reported int
	var mu sync.Mutex
	p := New(watermill.NopLogger{}, 100, func(_ string, n int) { mu.Lock(); reported += n; mu.Unlock() })
	defer p.Close()
	ctxA, cancelA := context.WithCancel(context.Background())
	a, err := p.Subscribe(ctxA, "t")
	if err != nil {
		t.Fatal(err)
	}
	ctxB, cancelB := context.WithCancel(context.Background())
	defer cancelB()
	b, err := p.Subscribe(ctxB, "t")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Publish("t", message.NewMessage("1", nil)); err != nil {
		t.Fatal(err)
	}
	var m *message.Message
	var other <-chan *message.Message
	select {
	case m = <-a:
		other = b
		cancelA()
	case m = <-b:
		other = a
		cancelB()
	case <-time.After(10 * time.Second):
		t.Fatal("nothing delivered")
	}
	// Its subscription ended; the handler gives it back: the other
	// subscription gets it.
	m.Nack()
	select {
	case again := <-other:
		if again.UUID != "1" {
			t.Fatalf("got %s, want 1 again", again.UUID)
		}
		again.Ack()
	case <-time.After(10 * time.Second):
		t.Fatal("a message nacked after its subscription ended was not redelivered to the other")
	}
	cancelA()
	cancelB()
	deadline := time.Now().Add(10 * time.Second)
	for {
		p.mu.Lock()
		subs := p.queues["t"].subs
		p.mu.Unlock()
		if subs == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d subscriptions still live after their contexts ended", subs)
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	if p.Pending() != 0 {
		t.Fatalf("Pending() = %d after the last subscription ended", p.Pending())
	}

	// Three wait for a subscription nobody reads; it ends: all three are
	// dropped as unheard.
	ctxC, cancelC := context.WithCancel(context.Background())
	c, err := p.Subscribe(ctxC, "t")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if err := p.Publish("t", message.NewMessage(fmt.Sprint("w", i), nil)); err != nil {
			t.Fatal(err)
		}
	}
	cancelC()
	for m := range c {
		m.Nack() // one handed over as it ended: given back
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		got := reported
		mu.Unlock()
		if p.Pending() == 0 && got == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Pending() = %d, reported unheard %d: want 0 and 3", p.Pending(), got)
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
}
