// Package memory keeps the session registry in this process: sessions,
// cloud nodes and online counts, for standalone runs and single-logic
// deployments.
package memory

import (
	"context"
	"maps"
	"sync"
	"time"
)

type session struct {
	mid     int64
	server  string
	expires time.Time
}

type node struct {
	addr    string
	conns   int32
	rooms   map[string]int32
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

// AddSession records that key (user mid) is connected to server. A key
// already connected elsewhere is moved; the previous server is returned.
func (r *Registry) AddSession(_ context.Context, mid int64, key, server string) (string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	prev, had := r.byKey[key]
	if had && prev.mid != mid {
		r.unlinkMid(prev.mid, key)
	}
	r.byKey[key] = session{mid: mid, server: server, expires: r.now().Add(r.sessionTTL)}
	keys := r.byMid[mid]
	if keys == nil {
		keys = map[string]struct{}{}
		r.byMid[mid] = keys
	}
	keys[key] = struct{}{}
	if had && prev.server != server && r.now().Before(prev.expires) {
		return prev.server, nil
	}
	return "", nil
}

// RenewSession extends a session's life; it re-creates one that expired.
func (r *Registry) RenewSession(ctx context.Context, mid int64, key, server string) error {
	_, err := r.AddSession(ctx, mid, key, server)
	return err
}

// DelSession removes key's session if it is still on server; it reports
// whether it did.
func (r *Registry) DelSession(_ context.Context, mid int64, key, server string) (bool, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.byKey[key]
	if !ok || s.server != server || s.mid != mid {
		return false, nil
	}
	delete(r.byKey, key)
	r.unlinkMid(mid, key)
	return true, nil
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

// KeysByMids maps every live key of the given users to its server, and
// lists the users with no live key.
func (r *Registry) KeysByMids(_ context.Context, mids []int64) (map[string]string, []int64, error) {
	now := r.now()
	out := map[string]string{}
	var offline []int64
	r.mu.RLock()
	defer r.mu.RUnlock()
	for _, mid := range mids {
		found := false
		for k := range r.byMid[mid] {
			if s := r.byKey[k]; now.Before(s.expires) {
				out[k] = s.server
				found = true
			}
		}
		if !found {
			offline = append(offline, mid)
		}
	}
	return out, offline, nil
}

// RenewNode records a cloud node, its gRPC address, its connection count
// and its per-room counts, and returns the online count of those rooms
// across every live node.
func (r *Registry) RenewNode(_ context.Context, id, addr string, conns int32, rooms map[string]int32) (map[string]int32, error) {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.nodes[id] = node{addr: addr, conns: conns, rooms: maps.Clone(rooms), expires: now.Add(r.nodeTTL)}
	all := make(map[string]int32, len(rooms))
	for _, n := range r.nodes {
		if now.After(n.expires) {
			continue
		}
		for room, c := range n.rooms {
			if _, asked := rooms[room]; asked {
				all[room] += c
			}
		}
	}
	return all, nil
}

// Online is the number of connections in room across live nodes, or of
// all connections when room is empty, as the nodes last reported them.
func (r *Registry) Online(_ context.Context, room string) (int, error) {
	now := r.now()
	r.mu.RLock()
	defer r.mu.RUnlock()
	n := 0
	for _, nd := range r.nodes {
		if now.After(nd.expires) {
			continue
		}
		if room == "" {
			n += int(nd.conns)
		} else {
			n += int(nd.rooms[room])
		}
	}
	return n, nil
}

// Nodes returns the live cloud nodes as id → gRPC address.
func (r *Registry) Nodes(_ context.Context) (map[string]string, error) {
	now := r.now()
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make(map[string]string, len(r.nodes))
	for id, n := range r.nodes {
		if now.Before(n.expires) {
			out[id] = n.addr
		}
	}
	return out, nil
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
}
