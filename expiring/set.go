package expiring

import (
	"crypto/sha256"
	"time"

	"github.com/google/uuid"
)

// Set remembers string ids for at least ttl and at most 2×ttl.
//
// Each id is kept as 16 bytes: a UUID's own bytes, any other id's SHA-256
// cut to 128 bits (ids can come from clients, so the hash must resist
// chosen collisions). Keys without pointers cost the garbage collector
// nothing to scan, and an entry takes about a third of a string key's
// memory: a node remembering ten minutes of a busy pipeline's ids holds
// millions of them.
type Set struct{ m *Map[[16]byte, struct{}] }

// NewSet returns an empty set whose ids live at least ttl.
func NewSet(ttl time.Duration) *Set { return &Set{m: New[[16]byte, struct{}](ttl)} }

// Has reports whether id was added within the set's ttl.
func (s *Set) Has(id string) bool {
	_, ok := s.m.Get(idKey(id))
	return ok
}

// Add remembers id.
func (s *Set) Add(id string) { s.m.Put(idKey(id), struct{}{}) }

// AddIfAbsent remembers id and reports whether it was new.
func (s *Set) AddIfAbsent(id string) bool { return s.m.PutIfAbsent(idKey(id), struct{}{}) }

// Remove forgets id.
func (s *Set) Remove(id string) { s.m.Delete(idKey(id)) }

func idKey(id string) [16]byte {
	if len(id) == 36 {
		if u, err := uuid.Parse(id); err == nil {
			return u
		}
	}
	sum := sha256.Sum256([]byte(id))
	return [16]byte(sum[:16])
}
