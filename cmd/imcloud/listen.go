package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"time"

	"imcloud/proto/client"
	"imcloud/proto/wire"
)

// cmdListen connects as a client and prints what arrives: the quickest way
// to watch a push reach a connection.
func cmdListen(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("listen", "imcloud listen --token T [--ws URL | --tcp ADDR]: connect as a client and print every message that arrives.", stderr)
	ws := fs.String("ws", "ws://127.0.0.1:3102/sub", "WebSocket endpoint")
	tcp := fs.String("tcp", "", "TCP address; used instead of --ws when set")
	token := fs.String("token", "", "auth body: a JWT from `imcloud token`, or goim JSON in insecure-json mode (required)")
	heartbeat := fs.Duration("heartbeat", 30*time.Second, "heartbeat period")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *token == "" {
		return errors.New("--token is required")
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	target := *ws
	if *tcp != "" {
		target = *tcp
	}
	c, err := client.Dial(ctx, target, client.Options{})
	if err != nil {
		return err
	}
	defer c.Close()
	go func() {
		<-ctx.Done()
		_ = c.Close()
	}()
	reply, err := c.Auth([]byte(*token))
	if err != nil {
		return fmt.Errorf("authenticate (was the token refused?): %w", err)
	}
	fmt.Fprintf(stdout, "connected: mid=%d key=%s rooms=%s\n", reply.Mid, reply.Key, strings.Join(reply.Rooms, ","))
	go func() {
		t := time.NewTicker(*heartbeat)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if _, err := c.Send(wire.OpHeartbeat, nil); err != nil {
					return
				}
			}
		}
	}()
	for {
		p, err := c.Read()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("connection ended: %w", err)
		}
		switch {
		case p.Op == wire.OpHeartbeatReply && len(p.Body) == 4:
			fmt.Fprintf(stdout, "heartbeat: room online %d\n", binary.BigEndian.Uint32(p.Body))
		default:
			fmt.Fprintf(stdout, "op=%d seq=%d %s\n", p.Op, p.Seq, p.Body)
		}
	}
}
