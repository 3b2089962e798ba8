// Package redis keeps the state several processes share in Redis: the
// session registry (pipeline.Registry), logic's idempotent replies
// (idempotency.Store), the delivered-message ids several jobs
// deduplicate against (pipeline.DedupeStore) and the streams' history
// (pipeline.History).
//
// One client (Connect) serves them all, on one server, the master a set of
// sentinels names, or a Redis Cluster. Under Cluster every Lua script and
// transaction touches keys of one hash slot only: a history stream's keys
// share the {stream} tag and a batch is split by slot, the node keys share
// {nodes}, and a session's key and its user's index are written by
// separate commands. What that changed in the stored layout (issue 16):
// the registry's node keys moved from node:<id>, nodes and nodes:version to
// {nodes}:node:<id>, {nodes}:ids and {nodes}:version, and a user's index
// entries hold "server conn" rather than the server (Registry says what a
// rolling upgrade sees); sessions, replies, dedupe marks and history keep
// their keys.
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
