// Package nodecache serves the live cloud node list from memory for a
// short time, so that a push does not read it from a shared registry.
//
// With registry.kind = redis every room push read the node list twice
// (logic's online count, job's node addresses): SMEMBERS + MGET each, two
// of a push's four sequential Redis round trips, and 30 % of the server's
// CPU under redis.(*Registry).Nodes (BENCHMARKS.md "History on vs off").
// The list changes when a node registers, lapses or reports (every
// cloud.renew_interval, 10 s by default), so a copy a fraction of that
// old says what the registry says.
package nodecache

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"imcloud/proto/pb"
)

// Lister lists the live cloud nodes (pipeline.Registry, job.Nodes).
type Lister interface {
	Nodes(ctx context.Context) ([]*pb.NodeInfo, error)
}

// fetchTimeout bounds one refresh: it runs apart from the caller that
// started it (others wait on it), so the caller's deadline cannot stop it.
const fetchTimeout = 5 * time.Second

// Cache is a Lister that asks its source at most once per TTL, however
// many callers ask at once: the first caller after expiry starts one
// fetch and every caller meanwhile waits for it (single flight). A failed
// fetch is returned to the callers that waited for it and not kept: the
// next caller fetches again. The lists it returns are shared: callers
// must not modify them.
type Cache struct {
	src Lister
	ttl time.Duration
	now func() time.Time

	mu      sync.Mutex
	nodes   []*pb.NodeInfo
	fetched time.Time // zero: nothing kept
	flight  *flight   // nil: no fetch running
}

type flight struct {
	done  chan struct{}
	nodes []*pb.NodeInfo
	err   error
}

// New returns a cache of src's list kept for ttl (> 0). now is the clock
// (nil: time.Now).
func New(src Lister, ttl time.Duration, now func() time.Time) *Cache {
	if now == nil {
		now = time.Now
	}
	return &Cache{src: src, ttl: ttl, now: now}
}

// Nodes returns the node list, fetched at most TTL ago.
func (c *Cache) Nodes(ctx context.Context) ([]*pb.NodeInfo, error) {
	return c.get(ctx, c.ttl)
}

// NodesWith returns the node list, read again when one of ids is not in
// the kept list: a node that just registered has its keys' pushes
// delivered without waiting for the TTL. Keys still registered on a
// lapsed node (until their sessions expire) cost a read per push, as
// every push did before the cache; concurrent ones share it.
func (c *Cache) NodesWith(ctx context.Context, ids []string) ([]*pb.NodeInfo, error) {
	nodes, err := c.get(ctx, c.ttl)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		if !slices.ContainsFunc(nodes, func(n *pb.NodeInfo) bool { return n.Id == id }) {
			return c.get(ctx, 0)
		}
	}
	return nodes, nil
}

// get returns the kept list if it is younger than maxAge, else joins or
// starts a fetch.
func (c *Cache) get(ctx context.Context, maxAge time.Duration) ([]*pb.NodeInfo, error) {
	c.mu.Lock()
	if !c.fetched.IsZero() && c.now().Sub(c.fetched) < maxAge {
		nodes := c.nodes
		c.mu.Unlock()
		return nodes, nil
	}
	f := c.flight
	if f == nil {
		f = &flight{done: make(chan struct{})}
		c.flight = f
		// The fetch outlives a caller that gives up: the others wait on it.
		fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
		go c.fetch(fctx, cancel, f)
	}
	c.mu.Unlock()
	select {
	case <-f.done:
		return f.nodes, f.err
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for the node list: %w", ctx.Err())
	}
}

func (c *Cache) fetch(ctx context.Context, cancel context.CancelFunc, f *flight) {
	defer cancel()
	// The clock is read before the fetch: the list is at least this old.
	at := c.now()
	f.nodes, f.err = c.src.Nodes(ctx)
	c.mu.Lock()
	if f.err == nil {
		c.nodes, c.fetched = f.nodes, at
	}
	c.flight = nil
	c.mu.Unlock()
	close(f.done)
}
