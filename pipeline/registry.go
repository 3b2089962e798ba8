package pipeline

import (
	"context"
	"time"

	"imcloud/proto/pb"
)

// Registry keeps which cloud node holds each session, and the cloud nodes
// themselves: logic writes it, job reads the nodes from it.
// adapters/memory and adapters/redis implement it; both pass
// adapters/registrytest.
type Registry interface {
	// AddSession records key (of user mid) on server as connection conn
	// and returns the server that held key before, if another one did,
	// and the connection there (0: unnamed, by an older node), so that
	// only that connection is closed, not a newer one of the same key.
	AddSession(ctx context.Context, mid int64, key, server string, conn uint64) (prev string, prevConn uint64, err error)
	// RenewSession extends the session of connection conn, re-creating it
	// if it expired; it leaves a live session of another connection alone.
	RenewSession(ctx context.Context, mid int64, key, server string, conn uint64) error
	// DelSession deletes key's session if it is mid's on server as
	// connection conn, and reports whether it did. conn 0, given or
	// stored (an older cloud node or logic), matches any connection.
	DelSession(ctx context.Context, mid int64, key, server string, conn uint64) (bool, error)
	// ServersByKeys maps live keys to servers; absent keys are offline.
	ServersByKeys(ctx context.Context, keys []string) (map[string]string, error)
	// SessionsByKeys maps live keys to their user and server; absent
	// keys are offline. Logic needs the user of a key push's keys: the
	// push takes a position in each one's user stream.
	SessionsByKeys(ctx context.Context, keys []string) (map[string]Session, error)
	// KeysByMids maps each user with live keys to its keys and their
	// servers; users with none are absent.
	KeysByMids(ctx context.Context, mids []int64) (map[int64]map[string]string, error)
	// RenewNode records a cloud node as it reports itself, returning the
	// cluster-wide counts of the rooms it reported.
	RenewNode(ctx context.Context, node *pb.NodeInfo) (map[string]int32, error)
	// Nodes returns the live cloud nodes.
	Nodes(ctx context.Context) ([]*pb.NodeInfo, error)
}

// Session is where a live key is connected, and whose it is. It is an
// alias of a plain struct so that adapters/memory implements Registry
// without importing pipeline: pipeline's own tests import adapters/memory.
type Session = struct {
	Mid    int64
	Server string
}

// Agreements records what every process of a cluster must agree on, such
// as topics.push_shards: a process that disagrees with one still running
// is refused at start, before it publishes or consumes anything.
type Agreements interface {
	// Agree records that member runs with name = value for ttl (call
	// again before it passes to stay recorded), unless a live member runs
	// with another value: that one is returned, and nothing is recorded.
	Agree(ctx context.Context, name, value, member string, ttl time.Duration) (Agreed, error)
	// Leave removes member's record of name.
	Leave(ctx context.Context, name, member string) error
	// Announce records that member runs with name = value for ttl, in
	// place of what it recorded before, whatever the others run with.
	Announce(ctx context.Context, name, value, member string, ttl time.Duration) error
	// Live returns every live member's value of name.
	Live(ctx context.Context, name string) ([]Agreed, error)
}

// JobShardsSetting is the name each job announces the push shards it
// consumes under, so that logic can say which no live job reads.
const JobShardsSetting = "job.shards"

// PushShardsSetting is the name processes agree on topics.push_shards
// under.
const PushShardsSetting = "topics.push_shards"

// Agreed is a live member's value of a setting; zero when none disagrees.
type Agreed struct{ Value, Member string }
