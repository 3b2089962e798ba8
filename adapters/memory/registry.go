// Package memory keeps state in this process, for standalone runs and
// single-logic deployments: the session registry (sessions, cloud nodes
// and online counts; pipeline.Registry), logic's idempotent replies
// (idempotency.Store) and job's delivered-message ids
// (pipeline.DedupeStore).
package memory

import (
	"context"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
)

type session struct {
	mid     int64
	server  string
	conn    uint64 // the connection on server; 0: unknown (an older node)
	expires time.Time
}

// keySession is pipeline.Session, spelled out: this package does not
// import pipeline, whose tests import it.
type keySession = struct {
	Mid    int64
	Server string
}

type node struct {
	info    *pb.NodeInfo
	expires time.Time
}

// Registry is an in-memory session and node registry. Entries expire when
// not renewed within their TTL.
type Registry struct {
	now        func() time.Time
	sessionTTL time.Duration
	nodeTTL    time.Duration

	mu    sync.RWMutex
	byKey map[string]session
	byMid map[int64]map[string]struct{}
	nodes map[string]node
	// live is the list Nodes answers until the first of its nodes
	// expires, dropped when a node reports or is swept: every push and
	// every delivery asks for it, and building and sorting it under the
	// registry's lock was 5.5 % of a batch's CPU (pprof, 84k pushes/s).
	live atomic.Pointer[nodeList]
}

type nodeList struct {
	nodes []*pb.NodeInfo
	until time.Time
}

// New returns a registry whose sessions live sessionTTL past their last
// heartbeat and whose nodes live nodeTTL past their last report.
func New(sessionTTL, nodeTTL time.Duration) *Registry {
	return &Registry{
		now:        time.Now,
		sessionTTL: sessionTTL,
		nodeTTL:    nodeTTL,
		byKey:      map[string]session{},
		byMid:      map[int64]map[string]struct{}{},
		nodes:      map[string]node{},
	}
}

// AddSession records that key (user mid) is connected to server as
// connection conn. A key already connected elsewhere is moved; the previous
// server and connection there are returned.
func (r *Registry) AddSession(_ context.Context, mid int64, key, server string, conn uint64) (string, uint64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	prev, prevConn := r.add(mid, key, server, conn)
	return prev, prevConn, nil
}

func (r *Registry) add(mid int64, key, server string, conn uint64) (string, uint64) {
	prev, had := r.byKey[key]
	if had && prev.mid != mid {
		r.unlinkMid(prev.mid, key)
	}
	r.byKey[key] = session{mid: mid, server: server, conn: conn, expires: r.now().Add(r.sessionTTL)}
	keys := r.byMid[mid]
	if keys == nil {
		keys = map[string]struct{}{}
		r.byMid[mid] = keys
	}
	keys[key] = struct{}{}
	if had && prev.server != server && r.now().Before(prev.expires) {
		return prev.server, prev.conn
	}
	return "", 0
}

// RenewSession extends a session's life; it re-creates one that expired.
// A live session of another connection (conn differs) is left alone: the
// heartbeat comes from a connection that was replaced.
func (r *Registry) RenewSession(_ context.Context, mid int64, key, server string, conn uint64) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if s, ok := r.byKey[key]; ok && otherConn(s.conn, conn) && r.now().Before(s.expires) {
		return nil
	}
	r.add(mid, key, server, conn)
	return nil
}

// DelSession removes key's session if it is still mid's on server as
// connection conn; it reports whether it did.
func (r *Registry) DelSession(_ context.Context, mid int64, key, server string, conn uint64) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.byKey[key]
	if !ok || s.server != server || s.mid != mid || otherConn(s.conn, conn) {
		return false, nil
	}
	delete(r.byKey, key)
	r.unlinkMid(mid, key)
	return true, nil
}

// otherConn reports whether a session stored for connection stored is
// another connection's than conn. 0 on either side is a connection of an
// older node or one registered through an older logic, which names none:
// it matches, as sessions did before they were named.
func otherConn(stored, conn uint64) bool {
	return stored != 0 && conn != 0 && stored != conn
}

func (r *Registry) unlinkMid(mid int64, key string) {
	if keys := r.byMid[mid]; keys != nil {
		delete(keys, key)
		if len(keys) == 0 {
			delete(r.byMid, mid)
		}
	}
}

// ServersByKeys maps each live key to its server; keys missing from the
// result are offline.
func (r *Registry) ServersByKeys(_ context.Context, keys []string) (map[string]string, error) {
	now := r.now()
	out := make(map[string]string, len(keys))
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, k := range keys {
		if s, ok := r.byKey[k]; ok && now.Before(s.expires) {
			out[k] = s.server
		}
	}
	return out, nil
}

// SessionsByKeys maps each live key to its user and server; keys missing
// from the result are offline.
func (r *Registry) SessionsByKeys(_ context.Context, keys []string) (map[string]keySession, error) {
	now := r.now()
	out := make(map[string]keySession, len(keys))
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, k := range keys {
		if s, ok := r.byKey[k]; ok && now.Before(s.expires) {
			out[k] = keySession{Mid: s.mid, Server: s.server}
		}
	}
	return out, nil
}

// KeysByMids maps each user with live keys to its keys and their servers.
func (r *Registry) KeysByMids(_ context.Context, mids []int64) (map[int64]map[string]string, error) {
	now := r.now()
	out := map[int64]map[string]string{}
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, mid := range mids {
		for k := range r.byMid[mid] {
			if s := r.byKey[k]; now.Before(s.expires) {
				if out[mid] == nil {
					out[mid] = map[string]string{}
				}
				out[mid][k] = s.server
			}
		}
	}
	return out, nil
}

// RenewNode records a cloud node as it reports itself and returns the
// online count of its rooms across every live node.
func (r *Registry) RenewNode(_ context.Context, info *pb.NodeInfo) (map[string]int32, error) {
	now := r.now()
	info = proto.Clone(info).(*pb.NodeInfo)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes[info.Id] = node{info: info, expires: now.Add(r.nodeTTL)}
	r.live.Store(nil)
	all := make(map[string]int32, len(info.RoomCount))
	for _, n := range r.nodes {
		if now.After(n.expires) {
			continue
		}
		for room, c := range n.info.RoomCount {
			if _, asked := info.RoomCount[room]; asked {
				all[room] += c
			}
		}
	}
	return all, nil
}

// Nodes returns the live cloud nodes, by id.
func (r *Registry) Nodes(_ context.Context) ([]*pb.NodeInfo, error) {
	now := r.now()
	if l := r.live.Load(); l != nil && now.Before(l.until) {
		return slices.Clone(l.nodes), nil
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	l := &nodeList{nodes: make([]*pb.NodeInfo, 0, len(r.nodes)), until: now.Add(r.nodeTTL)}
	for _, n := range r.nodes {
		if now.Before(n.expires) {
			l.nodes = append(l.nodes, n.info)
			if n.expires.Before(l.until) {
				l.until = n.expires
			}
		}
	}
	slices.SortFunc(l.nodes, func(a, b *pb.NodeInfo) int { return strings.Compare(a.Id, b.Id) })
	r.live.Store(l)
	return slices.Clone(l.nodes), nil
}

// Run sweeps expired entries every minute until ctx ends, bounding memory.
func (r *Registry) Run(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.Sweep()
		}
	}
}

// Sweep drops expired entries.
func (r *Registry) Sweep() {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for k, s := range r.byKey {
		if now.After(s.expires) {
			delete(r.byKey, k)
			r.unlinkMid(s.mid, k)
		}
	}
	for id, n := range r.nodes {
		if now.After(n.expires) {
			delete(r.nodes, id)
		}
	}
	r.live.Store(nil)
}

// InProcess says the store answers from memory without blocking
// (pipeline.InProcess).
func (*Registry) InProcess() {}
