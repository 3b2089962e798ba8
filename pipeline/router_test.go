package pipeline

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"imcloud/config"
	"imcloud/proto/pb"
)

// TestFailingHandlerIsRetriedThenPoisoned checks the middleware order: the
// poison queue sits outside retry, so a message is poisoned only after
// every retry failed, and a panic counts as a failure.
func TestFailingHandlerIsRetriedThenPoisoned(t *testing.T) {
	for _, panics := range []bool{false, true} {
		name := "error"
		if panics {
			name = "panic"
		}
		t.Run(name, func(t *testing.T) {
			logger := slog.New(slog.DiscardHandler)
			pubsub := gochannel.NewGoChannel(gochannel.Config{}, WatermillLogger(logger))
			defer pubsub.Close()
			cfg := config.Default().Job
			cfg.Retry.MaxRetries = 3
			cfg.Retry.InitialInterval = time.Millisecond
			cfg.Retry.MaxInterval = 5 * time.Millisecond
			r, err := NewRouter(cfg, "poison", pubsub, logger)
			if err != nil {
				t.Fatal(err)
			}
			var attempts atomic.Int32
			r.AddConsumerHandler("h", "push", pubsub, func(*message.Message) error {
				attempts.Add(1)
				if panics {
					panic("boom")
				}
				return errors.New("cloud unreachable")
			})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			poisoned, err := pubsub.Subscribe(ctx, "poison")
			if err != nil {
				t.Fatal(err)
			}
			go func() { _ = r.Run(ctx) }()
			<-r.Running()

			msg, err := NewPushMessage("id-1", "corr-1", &pb.PushMsg{Operation: 1000})
			if err != nil {
				t.Fatal(err)
			}
			if err := pubsub.Publish("push", msg); err != nil {
				t.Fatal(err)
			}
			select {
			case p := <-poisoned:
				p.Ack()
				if got := attempts.Load(); got != int32(cfg.Retry.MaxRetries+1) {
					t.Fatalf("handler ran %d times before poisoning, want %d", got, cfg.Retry.MaxRetries+1)
				}
				if p.Metadata.Get(middleware.ReasonForPoisonedKey) == "" || p.Metadata.Get(MetaMessageID) != "id-1" {
					t.Fatalf("poisoned message metadata %v lacks reason or id", p.Metadata)
				}
				if middleware.MessageCorrelationID(p) != "corr-1" {
					t.Fatalf("correlation id %q, want corr-1", middleware.MessageCorrelationID(p))
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("nothing poisoned after %d attempts", attempts.Load())
			}
		})
	}
}
