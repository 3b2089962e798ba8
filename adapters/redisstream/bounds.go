package redisstream

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	goredis "github.com/redis/go-redis/v9"

	"imcloud/pipeline"
)

// ErrQueueFull is returned for a message refused because its stream holds
// its limit of entries.
var ErrQueueFull = fmt.Errorf("redis stream full: %w", pipeline.ErrQueueFull)

// TrimEvery is how often BoundedPublisher trims its streams and checks
// their length. A stream may pass its limit by what is published in one
// period: at 30k pushes/s, 30k entries over a 1M limit.
const TrimEvery = time.Second

// BoundedPublisher bounds the streams it publishes to. A stream keeps its
// entries after they are acked, so it trims each periodically to the
// oldest entry any consumer group still needs: the oldest pending (read,
// not acked) entry, or the last one delivered when none is pending.
// Entries not yet acked by every group are never trimmed. A stream that
// holds its limit anyway (no consumer, or consumers far behind) refuses
// new messages with ErrQueueFull until it is trimmed below it: nothing is
// dropped without the publisher knowing.
type BoundedPublisher struct {
	pub    message.Publisher
	rdb    goredis.UniversalClient
	limits map[string]int64
	full   map[string]*atomic.Bool
	logger watermill.LoggerAdapter

	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// NewBoundedPublisher wraps pub, which publishes through rdb, bounding
// the streams limits names; it trims them every period until closed.
func NewBoundedPublisher(pub message.Publisher, rdb goredis.UniversalClient, limits map[string]int64, every time.Duration, logger watermill.LoggerAdapter) *BoundedPublisher {
	b := &BoundedPublisher{pub: pub, rdb: rdb, limits: limits, full: map[string]*atomic.Bool{}, logger: logger, stop: make(chan struct{}), done: make(chan struct{})}
	for topic := range limits {
		b.full[topic] = &atomic.Bool{}
	}
	go b.run(every)
	return b
}

// Publish publishes msgs unless topic's stream is full.
func (b *BoundedPublisher) Publish(topic string, msgs ...*message.Message) error {
	if f := b.full[topic]; f != nil && f.Load() {
		return fmt.Errorf("%w: stream %s holds its limit of %d entries", ErrQueueFull, topic, b.limits[topic])
	}
	return b.pub.Publish(topic, msgs...)
}

// Close stops trimming and closes the publisher.
func (b *BoundedPublisher) Close() error {
	b.closeOnce.Do(func() { close(b.stop) })
	<-b.done
	return b.pub.Close()
}

func (b *BoundedPublisher) run(every time.Duration) {
	defer close(b.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-b.stop
		cancel()
	}()
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		b.TrimAll(ctx)
		select {
		case <-b.stop:
			return
		case <-t.C:
		}
	}
}

// TrimAll trims every bounded stream once and updates whether it is full.
func (b *BoundedPublisher) TrimAll(ctx context.Context) {
	for topic, limit := range b.limits {
		n, err := Trim(ctx, b.rdb, topic)
		if err != nil {
			if ctx.Err() == nil {
				b.logger.Error("trim redis stream", err, watermill.LogFields{"stream": topic})
			}
			continue
		}
		full := n >= limit
		if was := b.full[topic].Swap(full); full && !was {
			b.logger.Error("redis stream full: publishes to it are refused until consumers catch up", ErrQueueFull,
				watermill.LogFields{"stream": topic, "length": n, "limit": limit})
		}
	}
}

// Trim removes stream's entries that every consumer group has acked and
// returns the stream's length after. A stream no group reads is not
// trimmed: nothing in it was acked.
func Trim(ctx context.Context, rdb goredis.UniversalClient, stream string) (int64, error) {
	groups, err := rdb.XInfoGroups(ctx, stream).Result()
	if err != nil {
		if strings.Contains(err.Error(), "no such key") {
			return 0, nil
		}
		return 0, fmt.Errorf("groups of %s: %w", stream, err)
	}
	floor := ""
	for _, g := range groups {
		keep := g.LastDeliveredID
		if g.Pending > 0 {
			p, err := rdb.XPending(ctx, stream, g.Name).Result()
			if err != nil {
				return 0, fmt.Errorf("pending of %s/%s: %w", stream, g.Name, err)
			}
			keep = p.Lower
		}
		if floor == "" || idLess(keep, floor) {
			floor = keep
		}
	}
	if floor != "" && floor != "0-0" {
		if err := rdb.XTrimMinID(ctx, stream, floor).Err(); err != nil {
			return 0, fmt.Errorf("trim %s to %s: %w", stream, floor, err)
		}
	}
	n, err := rdb.XLen(ctx, stream).Result()
	if err != nil {
		return 0, fmt.Errorf("length of %s: %w", stream, err)
	}
	return n, nil
}

// idLess compares two stream ids, "ms-seq".
func idLess(a, b string) bool {
	am, as := splitID(a)
	bm, bs := splitID(b)
	if am != bm {
		return am < bm
	}
	return as < bs
}

func splitID(id string) (uint64, uint64) {
	ms, seq, _ := strings.Cut(id, "-")
	m, _ := strconv.ParseUint(ms, 10, 64)
	s, _ := strconv.ParseUint(seq, 10, 64)
	return m, s
}
