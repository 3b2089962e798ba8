// Package idempotency holds what the push API's Idempotency-Key stores
// share: the states a key can be in and the contract both stores
// (adapters/memory, adapters/redis) implement. It follows the IETF draft
// httpapi-idempotency-key-header: a key is reserved before the request
// runs, so a concurrent request with it gets 409; the reply is stored with
// a fingerprint of the request, so a reuse with other content gets 422.
package idempotency

import (
	"context"
	"time"
)

// State is where a key stands when a request tries to reserve it.
type State int

const (
	// Reserved: the key was free and is now held by this request, which
	// must Complete or Release it.
	Reserved State = iota + 1
	// InFlight: another request holds the key and has not finished.
	InFlight
	// Done: a request with the key finished; its reply is stored.
	Done
)

func (s State) String() string {
	switch s {
	case Reserved:
		return "reserved"
	case InFlight:
		return "in flight"
	case Done:
		return "done"
	}
	return "unknown"
}

// Entry is what Reserve found or made for a key.
type Entry struct {
	State State
	// Fingerprint is the fingerprint of the request that holds (InFlight)
	// or completed (Done) the key; for Reserved, this request's.
	Fingerprint string
	// Reply is the stored reply of a Done key.
	Reply []byte
	// Token identifies a Reserved holder to Complete and Release: a
	// holder whose reservation lapsed cannot complete another's.
	Token string
}

// InFlightTTL bounds how long a reservation lives if its holder never
// completes or releases it (a crashed logic node). A push is answered in
// milliseconds (BENCHMARKS.md: p99 under 20 ms through RabbitMQ), and the
// HTTP server's write timeout (logic.write_timeout, 30 s) ends the
// exchange long before; a retry after a crash waits at most this long.
const InFlightTTL = time.Minute

// Store keeps Idempotency-Key reservations and replies.
type Store interface {
	// Reserve claims key for a request with fingerprint fp, or reports
	// who holds it or what it answered.
	Reserve(ctx context.Context, key, fp string) (Entry, error)
	// Complete stores reply for a key this request reserved (token from
	// Reserve); it is kept for the store's TTL.
	Complete(ctx context.Context, key, token string, reply []byte) error
	// Release frees a key this request reserved whose request failed, so
	// that a retry can run.
	Release(ctx context.Context, key, token string) error
}
