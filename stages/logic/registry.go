package logic

import (
	"context"

	"imcloud/proto/pb"
)

// Registry keeps which cloud node holds each session, and the cloud nodes
// themselves. adapters/memory and adapters/redis implement it; both pass
// adapters/registrytest.
type Registry interface {
	// AddSession records key (of user mid) on server and returns the server
	// that held key before, if another one did.
	AddSession(ctx context.Context, mid int64, key, server string) (prev string, err error)
	RenewSession(ctx context.Context, mid int64, key, server string) error
	DelSession(ctx context.Context, mid int64, key, server string) (bool, error)
	// ServersByKeys maps live keys to servers; absent keys are offline.
	ServersByKeys(ctx context.Context, keys []string) (map[string]string, error)
	// KeysByMids maps each user with live keys to its keys and their
	// servers; users with none are absent.
	KeysByMids(ctx context.Context, mids []int64) (map[int64]map[string]string, error)
	// RenewNode records a cloud node as it reports itself, returning the
	// cluster-wide counts of the rooms it reported.
	RenewNode(ctx context.Context, node *pb.NodeInfo) (map[string]int32, error)
	// Nodes returns the live cloud nodes.
	Nodes(ctx context.Context) ([]*pb.NodeInfo, error)
}
