package logic

import (
	"context"
	"log/slog"
	"time"

	"imcloud/cloudconn"
	"imcloud/proto/pb"
)

// closeTimeout bounds telling a node to close a replaced connection.
const closeTimeout = 5 * time.Second

// replacer closes a key's connection on the node it was on when the key
// connects on another: one session per key across the cluster.
type replacer struct {
	registry Registry
	logger   *slog.Logger
	clouds   *cloudconn.Pool
}

// replaced closes key on node prev, in the background: the new
// connection does not wait for the old one to go.
func (r *replacer) replaced(key, prev string) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		if err := r.close(ctx, key, prev); err != nil {
			r.logger.Warn("close replaced connection", "key", key, "node", prev, "err", err)
		}
	}()
}

func (r *replacer) close(ctx context.Context, key, prev string) error {
	nodes, err := r.registry.Nodes(ctx)
	if err != nil {
		return err
	}
	for _, n := range nodes {
		if n.Id != prev {
			continue
		}
		c, err := r.clouds.Client(n.GrpcAddr)
		if err != nil {
			return err
		}
		_, err = c.Close(ctx, &pb.CloseReq{Key: key})
		return err
	}
	return nil // the node is gone, and the connection with it
}

// Close closes the connections to cloud nodes.
func (r *replacer) Close() error { return r.clouds.Close() }
