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
	fs := newFlagSet("listen", "imcloud listen --token T [--ws URL | --tcp ADDR]: connect as a client and print every message that arrives; with a token from `imcloud token --recover`, room and user messages print with their stream, epoch and position.", stderr)
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
	if reply.Recover {
		if err := startPositioned(c, reply, stdout); err != nil {
			return err
		}
	}
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
		m, err := c.ReadMessage()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("connection ended: %w", err)
		}
		switch {
		case m.Stream != "":
			// op 20: the business op and body, with where the message
			// is in its stream.
			note := ""
			switch {
			case m.Gap:
				note = " (gap: messages before it were lost, or the epoch changed)"
			case m.Dup:
				note = " (duplicate: a position already received)"
			}
			fmt.Fprintf(stdout, "stream=%s epoch=%s pos=%d op=%d seq=%d %s%s\n", m.Stream, m.Epoch, m.Pos, m.Op, m.Seq, m.Body, note)
		case m.Op == wire.OpHeartbeatReply && len(m.Body) == 4:
			fmt.Fprintf(stdout, "heartbeat: room online %d\n", binary.BigEndian.Uint32(m.Body))
		default:
			fmt.Fprintf(stdout, "op=%d seq=%d %s\n", m.Op, m.Seq, m.Body)
		}
	}
}

// startPositioned is what a client that opted in (a --recover token) does
// after op 8: it prints where each stream starts and sends op 21, naming
// no stream — listen keeps no positions between runs — so that the node
// stops holding its positioned messages (it would until
// cloud.handshake_timeout). With acks on, the user's unacknowledged
// messages then come first; listen never acks, so a fresh listen shows
// them again.
func startPositioned(c *client.Conn, reply client.AuthReply, stdout io.Writer) error {
	fmt.Fprintf(stdout, "positioned delivery on: acks=%t\n", reply.Acks)
	for _, s := range reply.Streams {
		fmt.Fprintf(stdout, "  stream=%s epoch=%s from pos=%d\n", s.Stream, s.Epoch, s.Pos)
	}
	if _, err := c.Recover(nil); err != nil {
		return fmt.Errorf("start positioned delivery (op 21): %w", err)
	}
	return nil
}
