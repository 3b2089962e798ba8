package process

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/google/uuid"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
)

// agreeShards refuses to start a process that publishes or consumes
// pushes with a topics.push_shards other than the one a live process of
// the cluster runs with: logic would put a room's pushes on a shard the
// other jobs do not read, or read another order than theirs. Then it
// keeps this process's record alive until ctx ends (stop removes it). A
// registry of one process (memory) has nothing to agree with.
func (p *Process) agreeShards(ctx context.Context) error {
	agreements := p.stores.Agreements
	if agreements == nil {
		return nil
	}
	value := strconv.Itoa(max(p.cfg.Topics.PushShards, 1))
	// "logic,job@host/pid/random" (or "@node_id/random"): what a refusal
	// names, so that the operator finds the process. The random part:
	// two processes of one node id (a restart while the old one drains)
	// must not take each other's record for their own.
	where := p.cfg.NodeID
	if where == "" {
		host, _ := os.Hostname()
		where = fmt.Sprintf("%s/%d", host, os.Getpid())
	}
	var stages []string
	for _, st := range p.cfg.Stages {
		if st != config.StageCloud {
			stages = append(stages, st)
		}
	}
	member := strings.Join(stages, ",") + "@" + where + "/" + uuid.NewString()[:8]
	every := p.cfg.Cloud.RenewInterval
	ttl := 3 * every
	agree := func(ctx context.Context) error {
		actx, cancel := context.WithTimeout(ctx, every)
		defer cancel()
		other, err := agreements.Agree(actx, pipeline.PushShardsSetting, value, member, ttl)
		if err != nil {
			return fmt.Errorf("check %s with the cluster: %w", pipeline.PushShardsSetting, err)
		}
		if other != (pipeline.Agreed{}) {
			return fmt.Errorf("%s = %s here, but %s runs with %s: every process of a cluster must use the same; to change it, drain the push queues, stop every logic and job, then start them all with the new value (README \"Scaling\")",
				pipeline.PushShardsSetting, value, other.Member, other.Value)
		}
		return nil
	}
	if err := agree(ctx); err != nil {
		return err
	}
	// A job says which shards it reads; a logic says which no live job
	// does: their pushes wait in their queues, answered 200, until one
	// does (README "Scaling").
	hasJob, hasLogic := p.cfg.Has(config.StageJob), p.cfg.Has(config.StageLogic)
	var shards []string
	for _, t := range p.cfg.JobTopics() {
		shards = append(shards, strconv.Itoa(slices.Index(p.cfg.Topics.PushTopics(), t)))
	}
	announce := func(ctx context.Context) error {
		if !hasJob {
			return nil
		}
		actx, cancel := context.WithTimeout(ctx, every)
		defer cancel()
		return agreements.Announce(actx, pipeline.JobShardsSetting, strings.Join(shards, ","), member, ttl)
	}
	if err := announce(ctx); err != nil {
		return fmt.Errorf("announce the push shards this job reads: %w", err)
	}
	unread := pipeline.NewRateLog(p.logger, slog.LevelWarn, time.Minute)
	checkCoverage := func(ctx context.Context) {
		if !hasLogic {
			return
		}
		actx, cancel := context.WithTimeout(ctx, every)
		defer cancel()
		jobs, err := agreements.Live(actx, pipeline.JobShardsSetting)
		if err != nil {
			return // the agreement's own renewal says Redis is away
		}
		if missing := unreadShards(p.cfg.Topics.PushShards, jobs); len(missing) > 0 {
			unread.Log("push shards no live job reads: their pushes are accepted and wait in their queues until a job consumes them (job.shards)",
				"shards", missing, "of", max(p.cfg.Topics.PushShards, 1), "jobs", len(jobs))
		}
	}
	// The renewals stop, and the last one is answered, before the record
	// is removed: one still on its way would record it again.
	ctx, stopRenewing := context.WithCancel(ctx)
	renewed := make(chan struct{})
	p.leave = func() {
		stopRenewing()
		<-renewed
		lctx, cancel := context.WithTimeout(context.Background(), every)
		defer cancel()
		if err := agreements.Leave(lctx, pipeline.PushShardsSetting, member); err != nil {
			p.logger.Warn("leave the cluster's shard agreement; a restart with another topics.push_shards waits for it to lapse", "after", ttl, "err", err)
		}
		if hasJob {
			_ = agreements.Leave(lctx, pipeline.JobShardsSetting, member)
		}
	}
	failed := pipeline.NewRateLog(p.logger, slog.LevelError, time.Minute)
	p.goLoop(func(ctx context.Context) {
		defer close(renewed)
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			// A record that lapsed (Redis unreachable for ttl) is made
			// again; a process that disagrees and started meanwhile is
			// only logged: this one cannot take back what it published.
			if err := agree(ctx); err != nil && ctx.Err() == nil {
				failed.Log("shard agreement", "err", err)
			}
			if err := announce(ctx); err != nil && ctx.Err() == nil {
				failed.Log("announce the push shards this job reads", "err", err)
			}
			checkCoverage(ctx)
		}
	}, ctx)
	return nil
}

// unreadShards are the push shards of n that none of jobs (each a
// comma-separated list of the shards one job reads) reads.
func unreadShards(n int, jobs []pipeline.Agreed) []int {
	read := make([]bool, max(n, 1))
	for _, j := range jobs {
		for f := range strings.SplitSeq(j.Value, ",") {
			if i, err := strconv.Atoi(f); err == nil && i >= 0 && i < len(read) {
				read[i] = true
			}
		}
	}
	var missing []int
	for i, ok := range read {
		if !ok {
			missing = append(missing, i)
		}
	}
	return missing
}
