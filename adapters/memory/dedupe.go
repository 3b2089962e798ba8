package memory

import (
	"context"
	"sync"
	"time"
)

// Dedupe remembers delivered message ids in this process for at least ttl.
// Ids live in two generations that rotate every ttl, so memory is bounded
// by what two ttl periods deliver and no per-id timer or sweep is needed.
type Dedupe struct {
	ttl time.Duration
	now func() time.Time

	mu        sync.Mutex
	cur, prev map[string]struct{}
	rotated   time.Time
}

// NewDedupe returns a store that remembers ids for at least ttl.
func NewDedupe(ttl time.Duration) *Dedupe {
	return &Dedupe{ttl: ttl, now: time.Now, cur: map[string]struct{}{}, prev: map[string]struct{}{}, rotated: time.Now()}
}

func (d *Dedupe) rotate() {
	now := d.now()
	switch since := now.Sub(d.rotated); {
	case since >= 2*d.ttl:
		d.cur, d.prev = map[string]struct{}{}, map[string]struct{}{}
	case since >= d.ttl:
		d.prev, d.cur = d.cur, map[string]struct{}{}
	default:
		return
	}
	d.rotated = now
}

// Delivered reports whether id was marked within the last ttl or more.
func (d *Dedupe) Delivered(_ context.Context, id string) (bool, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.rotate()
	_, inCur := d.cur[id]
	_, inPrev := d.prev[id]
	return inCur || inPrev, nil
}

// MarkDelivered remembers id. The store's own ttl applies.
func (d *Dedupe) MarkDelivered(_ context.Context, id string, _ time.Duration) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.rotate()
	d.cur[id] = struct{}{}
	return nil
}
