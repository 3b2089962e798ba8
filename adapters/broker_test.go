package adapters

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/gochannel"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
)

// TestEmbeddedBrokerLogsUnheardOnce: in standalone nothing subscribes to
// topics.upstream; what is published there is dropped, and said so once
// (not once per message).
func TestEmbeddedBrokerLogsUnheardOnce(t *testing.T) {
	var logs bytes.Buffer
	cfg := config.Default()
	cfg.Broker.Kind = config.BrokerGoChannel
	b, err := OpenBroker(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for i := range 100 {
		if err := b.Publisher.Publish(cfg.Topics.Upstream, message.NewMessage(fmt.Sprint(i), nil)); err != nil {
			t.Fatal(err)
		}
	}
	if n := strings.Count(logs.String(), "embedded broker dropped messages"); n != 1 {
		t.Fatalf("100 dropped messages logged %d times, want 1:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "topic="+cfg.Topics.Upstream) {
		t.Fatalf("log does not name the topic:\n%s", logs.String())
	}
}

// TestEmbeddedBrokerKeepsPoison: what job poisons on the embedded broker
// is held for an admin in the process, not dropped as unheard.
func TestEmbeddedBrokerKeepsPoison(t *testing.T) {
	var logs bytes.Buffer
	cfg := config.Default()
	cfg.Broker.Kind = config.BrokerGoChannel
	b, err := OpenBroker(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	msg := message.NewMessage("u1", []byte("body"))
	msg.Metadata.Set(pipeline.MetaMessageID, "m1")
	if err := b.Publisher.Publish(cfg.Topics.Poison, msg); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), "dropped") {
		t.Fatalf("poisoned message dropped:\n%s", logs.String())
	}
	admin, local, err := LocalPoison(cfg, b)
	if err != nil || !local {
		t.Fatalf("LocalPoison of the embedded broker: %v, %v; want its admin", local, err)
	}
	msgs, _, err := admin.List(context.Background(), "", 1000)
	if err != nil || len(msgs) != 1 || msgs[0].ID != "m1" {
		t.Fatalf("listed %+v, %v; want m1", msgs, err)
	}
}

// TestOpenPoisonRefuses: the embedded broker's poison topic cannot be
// reached from another process, and an unknown kind has no admin; both
// say so.
func TestOpenPoisonRefuses(t *testing.T) {
	tests := []struct {
		kind, want string
	}{
		{config.BrokerGoChannel, "--admin"},
		{"kafka", "not implemented"},
	}
	for _, tt := range tests {
		t.Run(tt.kind, func(t *testing.T) {
			cfg := config.Default()
			cfg.Broker.Kind = tt.kind
			a, err := OpenPoison(cfg, slog.New(slog.DiscardHandler))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("OpenPoison(%s) = %v, %v; want an error saying %q", tt.kind, a, err, tt.want)
			}
		})
	}
}

// TestEmbeddedBrokerEvictsOldestPoison: past broker.gochannel.max_poisoned
// the embedded broker evicts the oldest poisoned message for each new one,
// never refusing the publish (a refusal failed the poison middleware, and
// the message came back for ever, holding a max_pending slot), and says
// so once, with the count.
func TestEmbeddedBrokerEvictsOldestPoison(t *testing.T) {
	tests := []struct {
		name                    string
		maxPoisoned, maxLength  int
		publish, want           int
		wantEvictedTotalInFirst string
	}{
		{"max_poisoned bounds it", 3, 1_000_000, 10, 3, "evicted_total=1"},
		{"topics.poison_max_length when smaller", 100, 2, 5, 2, "evicted_total=1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var logs logtest.Buffer
			cfg := config.Default()
			cfg.Broker.Kind = config.BrokerGoChannel
			cfg.Broker.GoChannel.MaxPoisoned = tt.maxPoisoned
			cfg.Topics.PoisonMaxLength = int64(tt.maxLength)
			b, err := OpenBroker(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
			if err != nil {
				t.Fatal(err)
			}
			defer b.Close()
			for i := range tt.publish {
				msg := message.NewMessage(fmt.Sprint(i), nil)
				if err := b.Publisher.Publish(cfg.Topics.Poison, msg); err != nil {
					t.Fatalf("poison publish %d past the bound: %v; want it taken", i, err)
				}
			}
			admin, _, err := LocalPoison(cfg, b)
			if err != nil {
				t.Fatal(err)
			}
			msgs, _, err := admin.List(context.Background(), "", 1000)
			if err != nil || len(msgs) != tt.want || msgs[0].ID != fmt.Sprint(tt.publish-tt.want) {
				t.Fatalf("kept %d (first %+v), %v; want the newest %d", len(msgs), msgs, err, tt.want)
			}
			if n := strings.Count(logs.String(), "evicted the oldest poisoned messages"); n != 1 {
				t.Fatalf("%d evictions logged %d times, want once:\n%s", tt.publish-tt.want, n, logs.String())
			}
			if !strings.Contains(logs.String(), tt.wantEvictedTotalInFirst) || !strings.Contains(logs.String(), "topic="+cfg.Topics.Poison) {
				t.Fatalf("eviction log lacks the count or the topic:\n%s", logs.String())
			}
			if gc := b.Subscriber.(*gochannel.PubSub); gc.Evicted(cfg.Topics.Poison) != int64(tt.publish-tt.want) || gc.Pending() != 0 {
				t.Fatalf("evicted %d, pending %d; want %d and 0", gc.Evicted(cfg.Topics.Poison), gc.Pending(), tt.publish-tt.want)
			}
		})
	}
}

// TestLocalPoisonOfSharedBroker: a broker that is not the embedded one has
// no admin in the process.
func TestLocalPoisonOfSharedBroker(t *testing.T) {
	admin, local, err := LocalPoison(config.Default(), &pipeline.Broker{})
	if admin != nil || local || err != nil {
		t.Fatalf("LocalPoison of a shared broker: %v, %v, %v; want nothing", admin, local, err)
	}
}
