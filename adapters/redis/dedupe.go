// Package redis keeps the state several processes share in Redis: the
// session registry (pipeline.Registry), logic's idempotent replies
// (idempotency.Store) and the delivered-message ids several jobs
// deduplicate against (pipeline.DedupeStore).
package redis

import (
	"context"
	"fmt"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// Dedupe remembers delivered message ids in Redis, shared by every job.
type Dedupe struct {
	rdb    goredis.UniversalClient
	prefix string
}

// NewDedupe stores ids under prefix in rdb.
func NewDedupe(rdb goredis.UniversalClient, prefix string) *Dedupe {
	return &Dedupe{rdb: rdb, prefix: prefix}
}

// Delivered reports whether id was marked and has not expired.
func (d *Dedupe) Delivered(ctx context.Context, id string) (bool, error) {
	n, err := d.rdb.Exists(ctx, d.prefix+id).Result()
	if err != nil {
		return false, fmt.Errorf("redis exists %s: %w", id, err)
	}
	return n == 1, nil
}

// MarkDelivered remembers id for ttl.
func (d *Dedupe) MarkDelivered(ctx context.Context, id string, ttl time.Duration) error {
	if err := d.rdb.Set(ctx, d.prefix+id, 1, ttl).Err(); err != nil {
		return fmt.Errorf("redis set %s: %w", id, err)
	}
	return nil
}

// Connect opens a client and checks the server answers.
func Connect(ctx context.Context, addr, password string, db int) (*goredis.Client, error) {
	c := goredis.NewClient(&goredis.Options{Addr: addr, Password: password, DB: db})
	if err := c.Ping(ctx).Err(); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("redis %s: %w", addr, err)
	}
	return c, nil
}
