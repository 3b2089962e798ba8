package pipeline

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"imcloud/pipeline/logtest"
)

// TestConfigFaultIsHeldNotPoisoned: on main a job without the cluster
// secret took every message, got Unauthenticated from the cloud nodes,
// retried it max_retries times and poisoned it. A ConfigError is neither
// retried nor poisoned: the message is held, handed back to the broker
// after the hold, and delivered once the calls succeed; the fault is
// logged once, naming the key.
func TestConfigFaultIsHeldNotPoisoned(t *testing.T) {
	const refusals = 10 * (maxRetries + 1) // far past what the retry budget allows
	var log logtest.Buffer
	logger := slog.New(slog.NewTextHandler(&log, nil))
	// A 20 ms hold makes the later refusals go back to the broker (a nack)
	// and come again.
	hold := holdTiming{first: time.Millisecond, max: 2 * time.Millisecond, total: 20 * time.Millisecond}
	publish, poisoned, tries := runRouterWith(t, logger, hold, func(msg *message.Message, attempt int) error {
		switch id := msg.Metadata.Get(MetaMessageID); {
		case id == "fence":
			return errors.New("cloud unreachable")
		case attempt <= refusals:
			return &ConfigError{Key: "cluster.secret", Err: status.Error(codes.Unauthenticated, "missing or wrong cluster secret")}
		default:
			return nil
		}
	})
	held := inBackground(func() error { return publish("held") })
	select {
	case err := <-held:
		if err != nil {
			t.Fatal(err)
		}
	case p := <-poisoned:
		p.Ack()
		t.Fatalf("%s poisoned after %d attempts: %s", p.Metadata.Get(MetaMessageID), tries.get("held"), p.Metadata)
	case <-time.After(10 * time.Second):
		t.Fatalf("not delivered after %d attempts", tries.get("held"))
	}
	if got := tries.get("held"); got != refusals+1 {
		t.Fatalf("handler ran %d times, want %d", got, refusals+1)
	}
	// Fence: a message that fails for its own sake is still poisoned, and
	// is the first thing the poison topic gets.
	fence := inBackground(func() error { return publish("fence") })
	select {
	case p := <-poisoned:
		p.Ack()
		if id := p.Metadata.Get(MetaMessageID); id != "fence" {
			t.Fatalf("poisoned %s, want only the fence", id)
		}
		if err := <-fence; err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the fence was not poisoned")
	}
	if n := strings.Count(log.String(), "cloud nodes refuse this job's calls"); n != 1 {
		t.Fatalf("the fault was logged %d times, want once:\n%s", n, log.String())
	}
	if !strings.Contains(log.String(), "cluster.secret") {
		t.Fatalf("the log does not name cluster.secret:\n%s", log.String())
	}
}

// TestHeldMessagesGoBackAtShutdown: a message held for offline recipients
// or for a configuration fault whose subscription ends (job shutting
// down) goes back to the broker, never to the poison topic.
func TestHeldMessagesGoBackAtShutdown(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	tests := []struct {
		name string
		mw   message.HandlerMiddleware
		err  error
	}{
		{"offline recipients", holdUndelivered(logger), &UndeliveredError{Recipients: 1, RetryUntil: time.Now().Add(time.Hour)}},
		{"configuration fault", holdConfigFault(logger, holdTiming{first: time.Millisecond, max: time.Millisecond, total: time.Hour}),
			&ConfigError{Key: "cluster.secret", Err: errors.New("refused")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			msg := message.NewMessage("m", nil)
			msg.SetContext(ctx)
			calls := 0
			h := tt.mw(func(*message.Message) ([]*message.Message, error) {
				if calls++; calls == 2 {
					cancel() // the subscription ends while the message is held
				}
				return nil, tt.err
			})
			_, err := h(msg)
			if err == nil || notPoison(err) {
				t.Fatalf("held message ended with %v: poisoned=%v, want handed back to the broker", err, notPoison(err))
			}
		})
	}
}
