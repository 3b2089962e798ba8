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
	gc, ok := b.Subscriber.(*gochannel.PubSub)
	if !ok {
		t.Fatalf("embedded subscriber is %T", b.Subscriber)
	}
	admin, err := gc.PoisonAdmin(cfg.Topics.Poison, cfg.Topics.Push)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := admin.List(context.Background())
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
		{config.BrokerGoChannel, "another process"},
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
