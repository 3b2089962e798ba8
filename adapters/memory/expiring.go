package memory

import (
	"sync"
	"time"
)

// expiring is a map whose entries live at least ttl and at most 2×ttl. Two
// generations rotate every ttl, so memory is bounded by what two periods
// add, with no per-entry timer and no sweep.
type expiring[V any] struct {
	ttl time.Duration
	now func() time.Time

	mu        sync.Mutex
	cur, prev map[string]V
	rotated   time.Time
}

func newExpiring[V any](ttl time.Duration) *expiring[V] {
	return &expiring[V]{ttl: ttl, now: time.Now, cur: map[string]V{}, prev: map[string]V{}, rotated: time.Now()}
}

func (e *expiring[V]) rotateLocked() {
	now := e.now()
	switch since := now.Sub(e.rotated); {
	case since >= 2*e.ttl:
		e.cur, e.prev = map[string]V{}, map[string]V{}
	case since >= e.ttl:
		e.prev, e.cur = e.cur, map[string]V{}
	default:
		return
	}
	e.rotated = now
}

func (e *expiring[V]) get(key string) (V, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rotateLocked()
	if v, ok := e.cur[key]; ok {
		return v, true
	}
	v, ok := e.prev[key]
	return v, ok
}

func (e *expiring[V]) put(key string, v V) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.rotateLocked()
	e.cur[key] = v
}
