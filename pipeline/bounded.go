package pipeline

import (
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/amqp"
	"imcloud/adapters/gochannel"
	"imcloud/adapters/nats"
	"imcloud/adapters/redisstream"
	"imcloud/pipeline/config"
)

// ErrQueueFull marks a publish refused because the topic's queue or
// stream is at its length limit (topics.*_max_length). Nothing was
// accepted; the caller may retry later. Logic answers it with 503, and a
// cloud node refuses the client's upstream message.
var ErrQueueFull = errors.New("queue full")

// queueFull reports whether err is any adapter's refusal for a full queue.
func queueFull(err error) bool {
	return errors.Is(err, amqp.ErrQueueFull) || errors.Is(err, gochannel.ErrQueueFull) || errors.Is(err, nats.ErrQueueFull) || errors.Is(err, redisstream.ErrQueueFull)
}

// boundedPublisher gives the adapters' "queue full" refusals one error,
// ErrQueueFull, counts the messages refused, and logs the refusals at
// most once per interval.
type boundedPublisher struct {
	message.Publisher
	refused *atomic.Int64
	log     *RateLog
}

func (b boundedPublisher) Publish(topic string, msgs ...*message.Message) error {
	err := b.Publisher.Publish(topic, msgs...)
	if err == nil || !queueFull(err) {
		return err
	}
	total := b.refused.Add(int64(len(msgs)))
	b.log.Log("publish refused: the topic's queue is full; raise topics.*_max_length or add consumers",
		"topic", topic, "refused_total", total, "err", err)
	return fmt.Errorf("%w: %w", ErrQueueFull, err)
}

// bound wraps the broker's publisher so that full queues surface as
// ErrQueueFull, counted in Refused.
func (b *Broker) bound(logger *slog.Logger) {
	b.refused = &atomic.Int64{}
	b.Publisher = boundedPublisher{Publisher: b.Publisher, refused: b.refused, log: NewRateLog(logger, slog.LevelWarn, 10*time.Second)}
}

// Refused counts the messages publishes refused for a full queue.
func (b *Broker) Refused() int64 {
	if b.refused == nil {
		return 0
	}
	return b.refused.Load()
}

// maxLengths maps each topic to its configured length limit.
func maxLengths(topics config.Topics) map[string]int64 {
	return map[string]int64{
		topics.Push:     topics.PushMaxLength,
		topics.Poison:   topics.PoisonMaxLength,
		topics.Upstream: topics.UpstreamMaxLength,
	}
}
