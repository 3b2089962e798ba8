package adapters

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"

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
