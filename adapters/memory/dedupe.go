package memory

import (
	"context"
	"time"

	"imcloud/pipeline/expiring"
)

// Dedupe remembers delivered message ids in this process for at least ttl.
type Dedupe struct{ ids *expiring.Set }

// NewDedupe returns a store that remembers ids for at least ttl.
func NewDedupe(ttl time.Duration) *Dedupe { return &Dedupe{ids: expiring.NewSet(ttl)} }

// InProcess says the store answers from memory without blocking
// (pipeline.InProcess): the dedupe middleware needs no timeout for it.
func (d *Dedupe) InProcess() {}

// Delivered reports whether id was marked within the store's ttl.
func (d *Dedupe) Delivered(_ context.Context, id string) (bool, error) {
	return d.ids.Has(id), nil
}

// MarkDelivered remembers id. The store's own ttl applies.
func (d *Dedupe) MarkDelivered(_ context.Context, id string, _ time.Duration) error {
	d.ids.Add(id)
	return nil
}
