// Package expiring is a map whose entries live at least a TTL and at most
// twice that, with memory bounded by what two TTL periods add.
package expiring

import (
	"sync"
	"time"
)

// Map is a map whose entries live at least ttl and at most 2×ttl. Two
// generations rotate every ttl, so there is no per-entry timer and no
// sweep. It is safe for concurrent use.
type Map[K comparable, V any] struct {
	ttl time.Duration
	now func() time.Time

	mu        sync.Mutex
	cur, prev map[K]V
	rotated   time.Time
}

// New returns an empty map whose entries live at least ttl.
func New[K comparable, V any](ttl time.Duration) *Map[K, V] {
	return &Map[K, V]{ttl: ttl, now: time.Now, cur: map[K]V{}, prev: map[K]V{}, rotated: time.Now()}
}

func (e *Map[K, V]) rotateLocked() {
	now := e.now()
	switch since := now.Sub(e.rotated); {
	case since >= 2*e.ttl:
		e.cur, e.prev = map[K]V{}, map[K]V{}
	case since >= e.ttl:
		e.prev, e.cur = e.cur, map[K]V{}
	default:
		return
	}
	e.rotated = now
}

// Get returns the value stored for key.
func (e *Map[K, V]) Get(key K) (V, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rotateLocked()
	if v, ok := e.cur[key]; ok {
		return v, true
	}
	v, ok := e.prev[key]
	return v, ok
}

// Put stores v for key.
func (e *Map[K, V]) Put(key K, v V) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rotateLocked()
	e.cur[key] = v
}

// PutIfAbsent stores v for key unless key is present, and reports whether
// it stored it.
func (e *Map[K, V]) PutIfAbsent(key K, v V) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rotateLocked()
	if _, ok := e.cur[key]; ok {
		return false
	}
	if _, ok := e.prev[key]; ok {
		return false
	}
	e.cur[key] = v
	return true
}

// Delete forgets key.
func (e *Map[K, V]) Delete(key K) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.cur, key)
	delete(e.prev, key)
}

// Len is how many entries the map holds, some perhaps past their ttl.
func (e *Map[K, V]) Len() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.cur) + len(e.prev)
}
