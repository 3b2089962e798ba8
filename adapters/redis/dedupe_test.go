//go:build integration

package redis

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"imcloud/adapters/dedupetest"
	"imcloud/adapters/registrytest"
	"imcloud/pipeline"
)

func TestIntegrationDedupeContract(t *testing.T) {
	eachSetup(t, func(t *testing.T, rdb goredis.UniversalClient) {
		dedupetest.Run(t, func(t *testing.T, _ time.Duration) pipeline.DedupeStore {
			prefix := registrytest.Prefix(t) + "dedupe:"
			t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
			return NewDedupe(rdb, prefix)
		})
	})
}

// pipelineCounter counts the pipelines a client sends.
type pipelineCounter struct{ n atomic.Int64 }

func (c *pipelineCounter) DialHook(next goredis.DialHook) goredis.DialHook          { return next }
func (c *pipelineCounter) ProcessHook(next goredis.ProcessHook) goredis.ProcessHook { return next }
func (c *pipelineCounter) ProcessPipelineHook(next goredis.ProcessPipelineHook) goredis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []goredis.Cmder) error {
		c.n.Add(1)
		return next(ctx, cmds)
	}
}

// TestIntegrationDedupePipelined: concurrent checks and marks are answered
// each as if alone, in far fewer round trips than commands.
func TestIntegrationDedupePipelined(t *testing.T) {
	rdb := connect(t, setup(t, "single"))
	counter := &pipelineCounter{}
	rdb.AddHook(counter)
	prefix := registrytest.Prefix(t) + "dedupe:"
	t.Cleanup(func() { dropKeys(t, rdb, prefix+"*") })
	d := NewDedupe(rdb, prefix)
	ctx := context.Background()
	const n = 2000
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			id := fmt.Sprint("m", i)
			if i%2 == 0 {
				if err := d.MarkDelivered(ctx, id, time.Minute); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			seen, err := d.Delivered(ctx, fmt.Sprint("m", i))
			if err == nil && seen != (i%2 == 0) {
				err = fmt.Errorf("m%d: delivered %v", i, seen)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if p := counter.n.Load(); p >= n {
		t.Fatalf("%d commands in %d pipelines: not gathered", n+n/2, p)
	}
	t.Logf("%d commands in %d round trips", n+n/2, counter.n.Load())
}
