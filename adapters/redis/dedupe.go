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
// Its checks and marks go to Redis in pipelines (autoPipeline): a bundle's
// pushes make them all at once.
type Dedupe struct {
	prefix string
	pipe   *autoPipeline
}

// NewDedupe stores ids under prefix in rdb.
func NewDedupe(rdb goredis.UniversalClient, prefix string) *Dedupe {
	return &Dedupe{prefix: prefix, pipe: newAutoPipeline(rdb)}
}

// Delivered reports whether id was marked and has not expired.
func (d *Dedupe) Delivered(ctx context.Context, id string) (bool, error) {
	cmd, err := d.pipe.do(ctx, func(p goredis.Pipeliner) goredis.Cmder { return p.Exists(ctx, d.prefix+id) })
	if err != nil {
		return false, fmt.Errorf("redis exists %s: %w", id, err)
	}
	return cmd.(*goredis.IntCmd).Val() == 1, nil
}

// MarkDelivered remembers id for ttl.
func (d *Dedupe) MarkDelivered(ctx context.Context, id string, ttl time.Duration) error {
	if _, err := d.pipe.do(ctx, func(p goredis.Pipeliner) goredis.Cmder { return p.Set(ctx, d.prefix+id, 1, ttl) }); err != nil {
		return fmt.Errorf("redis set %s: %w", id, err)
	}
	return nil
}
