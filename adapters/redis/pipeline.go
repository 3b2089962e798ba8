package redis

import (
	"context"
	"errors"
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
	ctx  context.Context // the caller's: one that gave up is not sent
	add  func(p goredis.Pipeliner) goredis.Cmder
	cmd  goredis.Cmder
	err  error
	done chan struct{}
}

// maxPipeQueue bounds the commands waiting for a pipeline: a Redis that
// stops answering takes pipeTimeout per pipeline, and what came meanwhile
// would otherwise pile up. Past it a command fails at once.
const maxPipeQueue = 16384

// errPipeFull is a command refused because maxPipeQueue wait.
var errPipeFull = errors.New("redis pipeline queue full: redis is not keeping up")

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
	c := &pipedCmd{ctx: ctx, add: add, done: make(chan struct{})}
	a.mu.Lock()
	if len(a.queue) >= maxPipeQueue {
		a.mu.Unlock()
		return nil, errPipeFull
	}
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
	sent := batch[:0:0]
	for _, c := range batch {
		if err := c.ctx.Err(); err != nil {
			c.err = err // its caller has gone: not sent
			close(c.done)
			continue
		}
		c.cmd = c.add(p)
		sent = append(sent, c)
	}
	if len(sent) == 0 {
		return
	}
	// Each command carries its own outcome: go-redis stamps a transport
	// failure on every command and leaves each its own reply's error, so
	// one command's (a SET refused at maxmemory) is not the others'.
	_, _ = p.Exec(ctx)
	for _, c := range sent {
		if err := c.cmd.Err(); err != nil && err != goredis.Nil {
			c.err = err
		}
		close(c.done)
	}
}
