package adapters

import (
	"context"
	"fmt"
	"log/slog"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/memory"
	"imcloud/adapters/redis"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/idempotency"
)

// Stores are the stores a process's stages keep their state in.
type Stores struct {
	Registry pipeline.Registry
	// Replies keeps logic's idempotent replies.
	Replies idempotency.Store
	// History keeps each stream's positions and last messages: in memory
	// for registry.kind memory, in Redis (the registry's client) for redis.
	// Its limits come per call; only its hard caps are set here. nil when
	// history.enabled is off: logic then gives no positions.
	History pipeline.History
	// Dedupe is job's deduplication store; nil when job.dedupe is off or
	// the process runs no job.
	Dedupe pipeline.DedupeStore
	// Run expires the in-memory registry's sessions and nodes until ctx
	// ends; nil for a registry that expires its own (Redis).
	Run func(ctx context.Context)
	// Agreements records the settings every process of a cluster must
	// share (topics.push_shards); nil for a registry of one process.
	Agreements pipeline.Agreements
	// Shared is true when the registry is shared between processes, so a
	// job without logic in its process can read the cloud nodes from it.
	Shared bool

	rdb goredis.UniversalClient
}

// OpenStores opens the registry and idempotency store registry.kind names
// and, for a process running job, the deduplication store
// job.dedupe.store names. Those on Redis share one client: one pool of
// connections to registry.redis, not one per store.
func OpenStores(ctx context.Context, cfg config.Config, logger *slog.Logger) (_ *Stores, err error) {
	s := &Stores{}
	defer func() {
		if err != nil {
			_ = s.Close()
		}
	}()
	rc := cfg.Registry.Redis
	client := func(key string) (goredis.UniversalClient, error) {
		if s.rdb == nil {
			rdb, err := redis.Connect(ctx, rc)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", key, err)
			}
			attrs := []any{"mode", rc.Mode, "tls", rc.TLS}
			switch rc.Mode {
			case config.RedisSingle:
				attrs = append(attrs, "addr", rc.Addr)
			case config.RedisSentinel:
				attrs = append(attrs, "sentinels", rc.Addrs, "master_name", rc.MasterName)
			default:
				attrs = append(attrs, "seeds", rc.Addrs)
			}
			logger.Info("redis connected", attrs...)
			s.rdb = rdb
		}
		return s.rdb, nil
	}
	// A node that misses three reports is gone.
	nodeTTL := 3 * cfg.Cloud.RenewInterval
	switch cfg.Registry.Kind {
	case config.RegistryRedis:
		rdb, err := client("registry.redis")
		if err != nil {
			return nil, err
		}
		s.Registry, s.Shared = redis.NewRegistry(rdb, rc.Prefix, cfg.Logic.SessionTTL, nodeTTL), true
		s.Replies = redis.NewReplies(rdb, rc.Prefix+"reply:", cfg.Logic.IdempotencyTTL)
		s.Agreements = redis.NewAgreements(rdb, rc.Prefix)
		if cfg.History.Enabled {
			if cfg.Has(config.StageLogic) {
				if err := redis.CheckReplicas(ctx, rdb, rc.WaitReplicas); err != nil {
					return nil, err
				}
			}
			s.History = redis.NewHistory(rdb, rc.Prefix+"history:", pipeline.HistoryCaps{}).WithReplicaWait(rc.WaitReplicas, rc.WaitTimeout)
		}
	case config.RegistryMemory:
		mem := memory.New(cfg.Logic.SessionTTL, nodeTTL)
		s.Registry, s.Run = mem, mem.Run
		if cfg.History.Enabled {
			s.History = memory.NewHistoryLogged(pipeline.HistoryCaps{
				MaxSize:       cfg.History.MaxSize,
				MaxStreams:    cfg.History.MaxStreams,
				MaxTotalBytes: cfg.History.MaxBytes,
			}, logger.With("stage", "logic", "component", "history"))
		}
		s.Replies = memory.NewRepliesLimited(cfg.Logic.IdempotencyTTL, cfg.Logic.IdempotencyMaxBytes, logger.With("stage", "logic", "component", "idempotency store"))
	default:
		return nil, fmt.Errorf("registry.kind %q: this build has no adapter for it", cfg.Registry.Kind)
	}
	if cfg.Has(config.StageJob) && cfg.Job.Dedupe.Enabled {
		switch cfg.Job.Dedupe.Store {
		case config.DedupeRedis:
			rdb, err := client("job.dedupe.store")
			if err != nil {
				return nil, err
			}
			s.Dedupe = redis.NewDedupe(rdb, rc.Prefix+"dedupe:")
		case config.DedupeMemory:
			s.Dedupe = memory.NewDedupe(cfg.Job.Dedupe.TTL)
		default:
			return nil, fmt.Errorf("job.dedupe.store %q: this build has no adapter for it", cfg.Job.Dedupe.Store)
		}
	}
	return s, nil
}

// Close closes the Redis client, if one was opened.
func (s *Stores) Close() error {
	if s.rdb == nil {
		return nil
	}
	return s.rdb.Close()
}
