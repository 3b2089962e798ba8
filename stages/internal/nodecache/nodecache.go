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

// Versioned is a Lister that tells, cheaply, whether its list changed:
// the Redis registry counts node reports. NodesSince then costs one small
// read, not the whole list, when nothing changed.
type Versioned interface {
	Lister
	NodesVersion(ctx context.Context) (uint64, error)
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
	fetched time.Time // the list was current then; zero: nothing kept
	version uint64    // the source's version when the list was read
	hasVer  bool      // version was read with the list
	flight  *flight   // nil: no fetch running
}

type flight struct {
	start time.Time // what it returns is current as of this
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
	return c.get(ctx, func(fetched time.Time) bool { return c.now().Sub(fetched) < c.ttl }, time.Time{})
}

// NodesWith returns the node list, read again when one of ids is not in
// the kept list: a node that just registered has its keys' pushes
// delivered without waiting for the TTL. Keys still registered on a
// lapsed node (until their sessions expire) cost a read per push, as
// every push did before the cache; concurrent ones share it.
func (c *Cache) NodesWith(ctx context.Context, ids []string) ([]*pb.NodeInfo, error) {
	nodes, err := c.Nodes(ctx)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		if !slices.ContainsFunc(nodes, func(n *pb.NodeInfo) bool { return n.Id == id }) {
			return c.get(ctx, func(time.Time) bool { return false }, time.Time{})
		}
	}
	return nodes, nil
}

// NodesSince returns a list holding every node report made before since:
// job routes a room push by it, and a node reports a room's first member
// before that client is told it joined, so a push accepted after the
// join — received by job after since — reaches the node. A list of the
// TTL missed such a member for up to a TTL (TestRoomPushRightAfterJoin).
// From a Versioned source a kept list is confirmed with one small read
// when the version did not move; callers arriving during a read that
// began before their since wait for the next, which all of them share.
func (c *Cache) NodesSince(ctx context.Context, since time.Time) ([]*pb.NodeInfo, error) {
	return c.get(ctx, func(fetched time.Time) bool { return !fetched.Before(since) }, since)
}

// get returns the kept list if fresh says it may, else the result of a
// fetch that began at or after after (joining one, or starting one).
func (c *Cache) get(ctx context.Context, fresh func(fetched time.Time) bool, after time.Time) ([]*pb.NodeInfo, error) {
	for {
		c.mu.Lock()
		if !c.fetched.IsZero() && fresh(c.fetched) {
			nodes := c.nodes
			c.mu.Unlock()
			return nodes, nil
		}
		f := c.flight
		if f == nil {
			f = &flight{start: c.now(), done: make(chan struct{})}
			c.flight = f
			// The fetch outlives a caller that gives up: the others wait on it.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), fetchTimeout)
			go c.fetch(fctx, cancel, f)
		}
		c.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return nil, fmt.Errorf("wait for the node list: %w", ctx.Err())
		}
		if f.start.Before(after) {
			continue // begun too early for this caller: the next one
		}
		return f.nodes, f.err
	}
}

func (c *Cache) fetch(ctx context.Context, cancel context.CancelFunc, f *flight) {
	defer cancel()
	// The version is read before the list, and the clock before both: the
	// list is at least that new, and a report between the two reads only
	// makes the next check read the list again.
	c.mu.Lock()
	kept, keptVer, hasVer := c.nodes, c.version, c.hasVer && !c.fetched.IsZero()
	c.mu.Unlock()
	var (
		ver uint64
		vok bool
	)
	if v, ok := c.src.(Versioned); ok {
		var err error
		ver, err = v.NodesVersion(ctx)
		vok = err == nil
	}
	if vok && hasVer && ver == keptVer {
		f.nodes = kept
	} else {
		f.nodes, f.err = c.src.Nodes(ctx)
	}
	c.mu.Lock()
	if f.err == nil {
		c.nodes, c.fetched, c.version, c.hasVer = f.nodes, f.start, ver, vok
	}
	c.flight = nil
	c.mu.Unlock()
	close(f.done)
}
