package logic

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"imcloud/pipeline"
	"imcloud/proto/pb"
	"imcloud/stages/internal/cloudconn"
)

// closeTimeout bounds telling a node to close a replaced connection.
const closeTimeout = 5 * time.Second

// replacer closes a key's connection on the node it was on when the key
// connects on another: one session per key across the cluster.
type replacer struct {
	registry pipeline.Registry
	logger   *slog.Logger
	clouds   *cloudconn.Pool
}

// replaced closes connection conn of key on node prev, in the
// background: the new connection does not wait for the old one to go.
// Naming the connection matters: by the time the call lands, the key may
// hold a newer connection on prev (the client reconnected there too),
// which closing by key alone would close instead, and the replaced one may
// not hold the key there yet (still in its handshake), which the node then
// remembers to close when it does.
func (r *replacer) replaced(key, prev string, conn uint64) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
		defer cancel()
		if err := r.close(ctx, key, prev, conn); err != nil {
			r.logger.Warn("close replaced connection", "key", key, "node", prev, "conn", conn, "err", err)
		}
	}()
}

func (r *replacer) close(ctx context.Context, key, prev string, conn uint64) error {
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
		if _, err := c.Close(ctx, &pb.CloseReq{Key: key, Conn: conn}); err != nil {
			return fmt.Errorf("close on node %s: %w", prev, err)
		}
		return nil
	}
	return nil // the node is gone, and the connection with it
}

// Close closes the connections to cloud nodes.
func (r *replacer) Close() error { return r.clouds.Close() }
