package logic

import "context"

// Registry keeps which cloud node holds each session, and the cloud nodes
// themselves. adapters/memory and adapters/redis implement it.
type Registry interface {
	// AddSession records key (of user mid) on server and returns the server
	// that held key before, if another one did.
	AddSession(ctx context.Context, mid int64, key, server string) (prev string, err error)
	RenewSession(ctx context.Context, mid int64, key, server string) error
	DelSession(ctx context.Context, mid int64, key, server string) (bool, error)
	// ServersByKeys maps live keys to servers; absent keys are offline.
	ServersByKeys(ctx context.Context, keys []string) (map[string]string, error)
	// KeysByMids maps the live keys of mids to servers and lists offline mids.
	KeysByMids(ctx context.Context, mids []int64) (map[string]string, []int64, error)
	// RenewNode records a cloud node, its connection count and room counts,
	// returning the cluster-wide counts of those rooms.
	RenewNode(ctx context.Context, id, addr string, conns int32, rooms map[string]int32) (map[string]int32, error)
	// Online counts connections in room (every connection when room is
	// empty) as the cloud nodes last reported them.
	Online(ctx context.Context, room string) (int, error)
}
