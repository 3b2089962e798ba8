package pipeline

import (
	"errors"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
)

// ErrQueueFull marks a publish refused because the topic's queue or
// stream is at its length limit (topics.*_max_length). Nothing was
// accepted; the caller may retry later. Logic answers it with 503, and a
// cloud node refuses the client's upstream message. Every adapter's
// refusal wraps it.
var ErrQueueFull = errors.New("queue full")

type refusals struct {
	n   atomic.Int64
	log *RateLog
}

// boundedPublisher counts the messages publishes refused for a full
// queue, and logs the refusals at most once per interval.
type boundedPublisher struct {
	message.Publisher
	refused *refusals
}

func (b boundedPublisher) Publish(topic string, msgs ...*message.Message) error {
	err := b.Publisher.Publish(topic, msgs...)
	if err == nil || !errors.Is(err, ErrQueueFull) {
		return err
	}
	total := b.refused.n.Add(int64(len(msgs)))
	b.refused.log.Log("publish refused: the topic's queue is full; raise topics.*_max_length or add consumers",
		"topic", topic, "refused_total", total, "err", err)
	return err
}

func bound(pub message.Publisher, logger *slog.Logger) (message.Publisher, *refusals) {
	r := &refusals{log: NewRateLog(logger, slog.LevelWarn, 10*time.Second)}
	return boundedPublisher{Publisher: pub, refused: r}, r
}

// Refused counts the messages publishes refused for a full queue.
func (b *Broker) Refused() int64 {
	if b.refused == nil {
		return 0
	}
	return b.refused.n.Load()
}
