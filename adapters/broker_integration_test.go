//go:build integration

package adapters

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"
	amqp091 "github.com/rabbitmq/amqp091-go"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/amqp/amqptest"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
)

const amqpURL = "amqp://guest:guest@127.0.0.1:5672/"

// testTopics are topics of the test's own, bounded as given.
func testTopics(t *testing.T, push, upstream int64) config.Topics {
	p := fmt.Sprintf("imcloud.bounds.%d", time.Now().UnixNano())
	return config.Topics{
		Push: p + ".push", Poison: p + ".poison", Upstream: p + ".upstream",
		PushMaxLength: push, PoisonMaxLength: 1000, UpstreamMaxLength: upstream,
	}
}

func deleteQueues(t *testing.T, topics config.Topics) {
	amqptest.DeleteAtEnd(t, amqpURL, topics.Push, topics.Poison, topics.Upstream)
}

func openBroker(t *testing.T, bc config.Broker, topics config.Topics) (*pipeline.Broker, *logtest.Buffer) {
	t.Helper()
	logs := &logtest.Buffer{}
	cfg := config.Default()
	cfg.Broker, cfg.Topics = bc, topics
	b, err := OpenBroker(cfg, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b, logs
}

func publish(b *pipeline.Broker, topic string, i int) error {
	msg := message.NewMessage(fmt.Sprint("m", i), []byte("x"))
	msg.SetContext(context.Background())
	return b.Publisher.Publish(topic, msg)
}

// fillUntilRefused publishes until a publish fails, up to max tries.
func fillUntilRefused(t *testing.T, b *pipeline.Broker, topic string, max int) (accepted int, err error) {
	t.Helper()
	for i := range max {
		if err := publish(b, topic, i); err != nil {
			return i, err
		}
	}
	return max, nil
}

func TestIntegrationAMQPQueueAtItsLimitRefusesThePublishWithErrQueueFull(t *testing.T) {
	tests := []struct {
		name  string
		topic func(config.Topics) string
	}{
		{"upstream, one message each", func(c config.Topics) string { return c.Upstream }},
		{"push", func(c config.Topics) string { return c.Push }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			topics := testTopics(t, 3, 3)
			deleteQueues(t, topics)
			b, logs := openBroker(t, config.Broker{Kind: config.BrokerAMQP, AMQP: config.AMQP{URL: amqpURL, Channels: 1, Prefetch: 1}}, topics)
			accepted, err := fillUntilRefused(t, b, tt.topic(topics), 10)
			if accepted != 3 || !errors.Is(err, pipeline.ErrQueueFull) {
				t.Fatalf("accepted %d publishes, then %v; want 3, then pipeline.ErrQueueFull", accepted, err)
			}
			for i := range 5 {
				if err := publish(b, tt.topic(topics), 100+i); !errors.Is(err, pipeline.ErrQueueFull) {
					t.Fatalf("publish to a full queue: %v, want pipeline.ErrQueueFull", err)
				}
			}
			if b.Refused() != 6 {
				t.Fatalf("Refused() = %d, want 6", b.Refused())
			}
			if n := strings.Count(logs.String(), "publish refused"); n != 1 {
				t.Fatalf("6 refusals logged %d times, want once:\n%s", n, logs)
			}
		})
	}
}

// A queue declared before the limits existed cannot take new arguments
// (PRECONDITION_FAILED); start-up goes on with it as it is and says how
// to apply them.
func TestIntegrationAMQPExistingQueueWithOtherArgumentsIsUsedAndReported(t *testing.T) {
	topics := testTopics(t, 3, 3)
	deleteQueues(t, topics)
	conn, err := amqp091.Dial(amqpURL)
	if err != nil {
		t.Fatal(err)
	}
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ch.QueueDeclare(topics.Upstream, true, false, false, false, amqp091.Table{"x-queue-version": 2}); err != nil {
		t.Fatal(err)
	}
	_ = conn.Close()

	b, logs := openBroker(t, config.Broker{Kind: config.BrokerAMQP, AMQP: config.AMQP{URL: amqpURL, Channels: 1, Prefetch: 1}}, topics)
	for i := range 5 {
		if err := publish(b, topics.Upstream, i); err != nil {
			t.Fatalf("publish %d to the existing queue: %v", i, err)
		}
	}
	if out := logs.String(); !strings.Contains(out, "exists with other arguments") || !strings.Contains(out, "rabbitmqctl delete_queue "+topics.Upstream) {
		t.Fatalf("no start-up line telling the operator about %s:\n%s", topics.Upstream, out)
	}
}

func TestIntegrationNATSStreamAtItsLimitRefusesThePublishWithErrQueueFull(t *testing.T) {
	topics := testTopics(t, 3, 3)
	t.Cleanup(func() {
		conn, err := nc.Connect(nc.DefaultURL)
		if err != nil {
			return
		}
		defer conn.Close()
		js, _ := conn.JetStream()
		for _, topic := range []string{topics.Push, topics.Poison, topics.Upstream} {
			_ = js.DeleteStream(strings.ReplaceAll(topic, ".", "_"))
		}
	})
	b, _ := openBroker(t, config.Broker{Kind: config.BrokerNATS, NATS: config.NATS{URL: nc.DefaultURL}, AMQP: config.AMQP{Prefetch: 1}}, topics)
	accepted, err := fillUntilRefused(t, b, topics.Upstream, 10)
	if accepted != 3 || !errors.Is(err, pipeline.ErrQueueFull) {
		t.Fatalf("accepted %d publishes, then %v; want 3, then pipeline.ErrQueueFull", accepted, err)
	}
}

func TestIntegrationRedisStreamAckedEntriesAreTrimmed(t *testing.T) {
	const n = 500
	topics := testTopics(t, 1_000_000, 3)
	rdb := goredis.NewClient(&goredis.Options{Addr: "127.0.0.1:6379"})
	t.Cleanup(func() {
		rdb.Del(context.Background(), topics.Push, topics.Poison, topics.Upstream)
		_ = rdb.Close()
	})
	b, _ := openBroker(t, config.Broker{Kind: config.BrokerRedisStream, RedisStream: config.RedisStream{Addr: "127.0.0.1:6379"}}, topics)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	msgs, err := b.Subscriber.Subscribe(ctx, topics.Push)
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := publish(b, topics.Push, i); err != nil {
			t.Fatal(err)
		}
	}
	for range n {
		select {
		case m := <-msgs:
			m.Ack()
		case <-time.After(10 * time.Second):
			t.Fatal("messages not delivered")
		}
	}
	// Acked entries go at the next trim (every redisstream.TrimEvery).
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, err := rdb.XLen(ctx, topics.Push).Result()
		if err != nil {
			t.Fatal(err)
		}
		if l <= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("push stream holds %d entries after %d were acked, want at most 1", l, n)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// Upstream has no consumer group: nothing is acked, nothing trimmed;
	// at its limit it refuses publishes instead of growing.
	deadline = time.Now().Add(10 * time.Second)
	var refused error
	for i := 0; refused == nil; i++ {
		refused = publish(b, topics.Upstream, i)
		if time.Now().After(deadline) {
			t.Fatal("a stream past its limit still takes publishes")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !errors.Is(refused, pipeline.ErrQueueFull) {
		t.Fatalf("publish to a full stream: %v, want pipeline.ErrQueueFull", refused)
	}
	if l, _ := rdb.XLen(ctx, topics.Upstream).Result(); l < 3 {
		t.Fatalf("stream refused publishes at %d entries, below its limit of 3", l)
	}
}
