package gochannel

import (
	"context"
	"errors"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/poisontest"
	"imcloud/pipeline"
)

// TestPoisonContract runs the poison admin contract on the embedded broker.
func TestPoisonContract(t *testing.T) {
	poisontest.Run(t, "imcloud.test.poison.", func(t *testing.T) poisontest.Broker {
		ps := New(watermill.NopLogger{}, 1000, nil)
		t.Cleanup(func() { _ = ps.Close() })
		return poisontest.Broker{
			Publisher: ps, Subscriber: ps, RecordsTime: true,
			Admin: func(t *testing.T, poison, target string) pipeline.PoisonAdmin {
				ps.Keep(poison, 100)
				a, err := ps.PoisonAdmin(poison, target)
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
		}
	})
}

// TestPoisonKept: a kept topic is bounded, is not counted unheard, and an
// admin refuses to replay to a topic nobody would receive.
func TestPoisonKept(t *testing.T) {
	ps := New(watermill.NopLogger{}, 1000, nil)
	defer ps.Close()
	ps.Keep("poison", 2)
	for i := range 2 {
		if err := ps.Publish("poison", message.NewMessage(watermill.NewUUID(), []byte{byte(i)})); err != nil {
			t.Fatal(err)
		}
	}
	if err := ps.Publish("poison", message.NewMessage(watermill.NewUUID(), nil)); !errors.Is(err, pipeline.ErrQueueFull) {
		t.Fatalf("publish past the bound: %v, want ErrQueueFull", err)
	}
	if ps.Unheard() != 0 {
		t.Fatalf("kept messages counted unheard: %d", ps.Unheard())
	}
	a, err := ps.PoisonAdmin("poison", "push")
	if err != nil {
		t.Fatal(err)
	}
	n, err := a.Replay(context.Background(), pipeline.All)
	if err == nil || n != 0 {
		t.Fatalf("replay with no subscriber to the target: %d, %v; want 0 and an error", n, err)
	}
	if msgs, _ := a.List(context.Background()); len(msgs) != 2 {
		t.Fatalf("refused replay lost messages: %d left", len(msgs))
	}
	if _, err := ps.PoisonAdmin("other", "push"); err == nil {
		t.Fatal("admin over a topic not kept: no error")
	}
}
