// Package redisstream is the Redis Streams broker: a stream per topic,
// consumed by one consumer group that every job shares.
//
// Publisher and Subscriber are watermill-redisstream's, which passes
// Watermill's universal Pub/Sub suite here (commit d261cf4): no race made
// us replace it. What is ours is BoundedPublisher: upstream's only bound
// is XADD MAXLEN (PublisherConfig.Maxlens), which drops the oldest
// entries whether or not a consumer acked them, and acked entries are
// never removed. Ours trims each stream to what every group acked and
// refuses with ErrQueueFull at its limit (commit 071e3ea), passing the
// limit by at most one TrimEvery of publishes (30k entries at 30k
// pushes/s). Its nack delay and redelivery time are the defaults every
// adapter shares (adapters/internal/settle).
package redisstream

import (
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-redisstream/pkg/redisstream"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/internal/settle"
)

// group is the consumer group jobs share.
const group = "imcloud"

// NewClient returns a client for addr suited to blocking stream reads.
func NewClient(addr string) *goredis.Client {
	return goredis.NewClient(&goredis.Options{Addr: addr, ReadTimeout: -1})
}

// NewPublisher returns a publisher on rdb; closing it closes rdb.
func NewPublisher(rdb goredis.UniversalClient, logger watermill.LoggerAdapter) (*redisstream.Publisher, error) {
	pub, err := redisstream.NewPublisher(redisstream.PublisherConfig{Client: rdb}, logger)
	if err != nil {
		return nil, fmt.Errorf("redis stream publisher: %w", err)
	}
	return pub, nil
}

// Timing tunes redelivery.
type Timing struct {
	// MaxIdle is how long a message may stay unacked before another
	// consumer claims it (its consumer presumed dead). It must exceed
	// job's worst case on one message, or a message still being retried
	// is delivered twice; broker.redisstream.redeliver_after sets it and
	// config validation checks it (config.JobWorstCase).
	MaxIdle time.Duration
	// ClaimEvery is how often idle messages are looked for (XAUTOCLAIM):
	// Redis-only, so not among settle's shared timings; 10 s adds at most
	// that to a dead consumer's message's wait, and is one cheap command
	// per subscription per interval.
	ClaimEvery time.Duration
	// NackDelay holds a nacked message before it is redelivered, so that a
	// failing message does not loop hot.
	NackDelay time.Duration
}

// DefaultTiming suits job's default settings: the ack timeout and nack
// delay every adapter shares (settle.Timing says why each), idle messages
// looked for every 10 s, so a dead consumer's message waits at most
// MaxIdle plus 10 s. MaxIdle is broker.redisstream.redeliver_after's
// default, above job's default worst case on one message (1m49.2s).
func DefaultTiming() Timing {
	t := settle.DefaultTiming()
	return Timing{MaxIdle: t.AckTimeout, ClaimEvery: 10 * time.Second, NackDelay: t.NackDelay}
}

// NewSubscriber returns a subscriber in the shared consumer group, named
// consumer; closing it closes rdb, so give it a client of its own.
func NewSubscriber(rdb goredis.UniversalClient, consumer string, timing Timing, logger watermill.LoggerAdapter) (*redisstream.Subscriber, error) {
	sub, err := redisstream.NewSubscriber(redisstream.SubscriberConfig{
		Client: rdb, Consumer: consumer, ConsumerGroup: group,
		NackResendSleep: timing.NackDelay, MaxIdleTime: timing.MaxIdle, ClaimInterval: timing.ClaimEvery,
	}, logger)
	if err != nil {
		return nil, fmt.Errorf("redis stream subscriber: %w", err)
	}
	return sub, nil
}
