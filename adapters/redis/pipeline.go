package redis

import (
	"context"
	"fmt"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// autoPipeline sends the commands of concurrent callers to Redis together,
// one pipeline (one round trip) for all that wait, the way the history's
// appends are batched: a caller that finds a sender free sends at once,
// alone; what arrives while pipelines are out goes in the next. Job's
// dedupe check and mark are two commands a push, each a round trip of its
// own before: with bundles of 256 pushes run at once, 512 round trips
// queued on go-redis' pool instead of a few pipelines (70 µs of job's CPU
// a push through RabbitMQ and Redis, measured with imcloud bench push
// --batch 100; see BENCHMARKS.md).
type autoPipeline struct {
	rdb goredis.UniversalClient

	mu      sync.Mutex
	queue   []*pipedCmd
	sending int
}

// pipedCmd is one caller's command: add queues it on a pipeline, and the
// Cmder it returns holds the reply once done is closed.
type pipedCmd struct {
	add  func(p goredis.Pipeliner) goredis.Cmder
	cmd  goredis.Cmder
	err  error
	done chan struct{}
}

// Bounds of the auto-pipeline: commands per round trip, pipelines out at
// once, and how long one may take (it runs apart from its callers, each of
// whom waits within its own context).
const (
	maxPiped    = 512
	pipeSenders = 4
	pipeTimeout = 5 * time.Second
)

func newAutoPipeline(rdb goredis.UniversalClient) *autoPipeline { return &autoPipeline{rdb: rdb} }

// do runs one command in the next pipeline and returns it, answered, or
// the context's error if it ends first.
func (a *autoPipeline) do(ctx context.Context, add func(p goredis.Pipeliner) goredis.Cmder) (goredis.Cmder, error) {
	c := &pipedCmd{add: add, done: make(chan struct{})}
	a.mu.Lock()
	a.queue = append(a.queue, c)
	start := a.sending < pipeSenders
	if start {
		a.sending++
	}
	a.mu.Unlock()
	if start {
		go a.send()
	}
	select {
	case <-c.done:
		return c.cmd, c.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// send sends what is queued, pipeline after pipeline, until nothing is.
func (a *autoPipeline) send() {
	for {
		a.mu.Lock()
		if len(a.queue) == 0 {
			a.sending--
			a.mu.Unlock()
			return
		}
		n := min(len(a.queue), maxPiped)
		batch := a.queue[:n:n]
		a.queue = a.queue[n:]
		a.mu.Unlock()
		a.exec(batch)
	}
}

func (a *autoPipeline) exec(batch []*pipedCmd) {
	ctx, cancel := context.WithTimeout(context.Background(), pipeTimeout)
	defer cancel()
	p := a.rdb.Pipeline()
	for _, c := range batch {
		c.cmd = c.add(p)
	}
	// Exec's error is the first command's that failed; each command
	// carries its own, which is what its caller gets.
	if _, err := p.Exec(ctx); err != nil && err != goredis.Nil {
		for _, c := range batch {
			if c.cmd.Err() == nil {
				c.err = fmt.Errorf("redis pipeline: %w", err)
			}
		}
	}
	for _, c := range batch {
		if c.err == nil && c.cmd.Err() != nil && c.cmd.Err() != goredis.Nil {
			c.err = c.cmd.Err()
		}
		close(c.done)
	}
}
