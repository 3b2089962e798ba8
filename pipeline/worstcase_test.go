package pipeline

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/pubsub/gochannel"

	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

// TestRetryBackoffMatchesConfig: the sleeps the router's Retry middleware
// really takes between the attempts of one message are what
// config.Job.RetryBackoff counts in job's worst case. Watermill draws the
// backoff twice per failed attempt, so they are longer than the textbook
// initial × multiplier^k: here 40+150+150+150 = 490ms, not
// 20+40+80+150 = 290ms.
func TestRetryBackoffMatchesConfig(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	job := config.Default().Job
	job.Retry = config.Retry{MaxRetries: 4, InitialInterval: 20 * time.Millisecond, MaxInterval: 150 * time.Millisecond, Multiplier: 2}
	want := job.RetryBackoff()
	cfg := RouterConfig{Timeout: job.Timeout, MaxRetries: 4, InitialInterval: 20 * time.Millisecond, MaxInterval: 150 * time.Millisecond, Multiplier: 2}
	if want != 490*time.Millisecond {
		t.Fatalf("RetryBackoff() = %s, want 490ms", want)
	}

	pubsub := gochannel.NewGoChannel(gochannel.Config{BlockPublishUntilSubscriberAck: true}, WatermillLogger(logger))
	t.Cleanup(func() { _ = pubsub.Close() })
	r, err := newRouter(cfg, "poison", pubsub, nil, logger, holdTiming{first: configHoldFirst, max: configHoldMax, total: config.ConfigFaultHold})
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		times []time.Time
	)
	r.AddConsumer("h", "push", pubsub, func(*message.Message) error {
		mu.Lock()
		times = append(times, time.Now())
		mu.Unlock()
		return errors.New("cloud unreachable")
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	poison, err := pubsub.Subscribe(ctx, "poison")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = r.Run(ctx) }()
	<-r.Running()
	t.Cleanup(func() { _ = r.Close() })

	msg, err := NewPushMessage("id-1", "corr-1", &pb.PushMsg{Operation: 1000})
	if err != nil {
		t.Fatal(err)
	}
	published := inBackground(func() error { return pubsub.Publish("push", msg) })
	select {
	case p := <-poison:
		p.Ack()
	case <-time.After(10 * time.Second):
		t.Fatal("nothing poisoned within 10s")
	}
	if err := <-published; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(times) != cfg.MaxRetries+1 {
		t.Fatalf("handler ran %d times, want %d", len(times), cfg.MaxRetries+1)
	}
	slept := times[len(times)-1].Sub(times[0])
	// Timers fire late, never early; a second of slack for a loaded
	// machine, still far from twice the count.
	if slept < want || slept > want+time.Second {
		t.Fatalf("attempts spanned %s, want %s (config.Job.RetryBackoff) to %s", slept, want, want+time.Second)
	}
}

// TestSettleTimeoutMatchesConfig: job's worst case counts the bound the
// router puts on the dedupe store and the poison publish.
func TestSettleTimeoutMatchesConfig(t *testing.T) {
	if MaxBundle != config.MaxBundle {
		t.Fatalf("pipeline.MaxBundle %d, config.MaxBundle %d: the worst case counts the wrong bundle", MaxBundle, config.MaxBundle)
	}
	if SettleTimeout != config.SettleTimeout {
		t.Fatalf("pipeline.SettleTimeout %s, config.SettleTimeout %s: the worst case counts the wrong bound", SettleTimeout, config.SettleTimeout)
	}
}

type deadlineRecorder struct {
	message.Publisher
	got chan time.Duration
}

func (d deadlineRecorder) Publish(topic string, msgs ...*message.Message) error {
	dl, ok := msgs[0].Context().Deadline()
	if !ok {
		d.got <- -1
		return nil
	}
	d.got <- time.Until(dl)
	return nil
}

// TestPoisonPublishBounded: the poison publish after the last attempt runs
// under SettleTimeout, so a broker that stops answering cannot hold the
// message past job's worst case.
func TestPoisonPublishBounded(t *testing.T) {
	rec := deadlineRecorder{got: make(chan time.Duration, 1)}
	msg := message.NewMessage("1", nil)
	if err := (timedPublisher{rec, func(string) {}, NewRateLog(slog.New(slog.DiscardHandler), slog.LevelWarn, time.Second)}).Publish("poison", msg); err != nil {
		t.Fatal(err)
	}
	if d := <-rec.got; d <= 0 || d > SettleTimeout {
		t.Fatalf("poison publish deadline in %s, want within SettleTimeout %s", d, SettleTimeout)
	}
	if _, ok := msg.Context().Deadline(); ok {
		t.Fatal("the message kept the publish's deadline")
	}
}
