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

// AddPairIfAbsent remembers the pair (id, sub) and reports whether it was
// new; RemovePair forgets it. A pair costs what an id does: it is hashed
// to 16 bytes in a stack buffer, with no string built for it.
func (s *Set) AddPairIfAbsent(id, sub string) bool {
	return s.m.PutIfAbsent(pairKey(id, sub), struct{}{})
}

// RemovePair forgets the pair (id, sub).
func (s *Set) RemovePair(id, sub string) { s.m.Delete(pairKey(id, sub)) }

func pairKey(id, sub string) [16]byte {
	var buf [256]byte
	b := append(append(append(buf[:0], id...), 0), sub...)
	sum := sha256.Sum256(b)
	return [16]byte(sum[:16])
}

func idKey(id string) [16]byte {
	if len(id) == 36 {
		if u, err := uuid.Parse(id); err == nil {
			return u
		}
	}
	sum := sha256.Sum256([]byte(id))
	return [16]byte(sum[:16])
}
