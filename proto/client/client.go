// Package client is a goim v2 protocol client over WebSocket or TCP, used
// by the end-to-end tests, the bench tool and `imcloud listen`.
package client

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"

	"imcloud/proto/wire"
)

// maxBody is the largest body the client accepts; a server's op 9 batch
// can be much larger than a single packet.
const maxBody = 16 << 20

// AuthReply is the op 8 body. Recover, Acks and Streams are only sent to
// a connection that opted in to positioned delivery (a goim client's op 8
// is unchanged).
type AuthReply struct {
	Mid       int64    `json:"mid"`
	Key       string   `json:"key"`
	Rooms     []string `json:"rooms"`
	Heartbeat int64    `json:"heartbeat"`
	// Recover: the connection receives business messages as op 20, with
	// their stream, epoch and position, and may send op 21 and op 23.
	Recover bool `json:"recover,omitempty"`
	// Acks: acks (op 23) of the user stream are kept.
	Acks bool `json:"acks,omitempty"`
	// Streams are the connection's streams (its user's and its rooms'),
	// each with the position after which it will receive the stream
	// unless its op 21 names the stream.
	Streams []wire.StreamPos `json:"streams,omitempty"`
}

// Conn is one client connection. Read is for one goroutine; Send may be
// called from any.
type Conn struct {
	ws      *websocket.Conn
	tcp     net.Conn
	tcpRead *wire.Reader

	wmu sync.Mutex
	seq int32

	// The reader's buffers, reused for every frame.
	frame   []byte
	pending []wire.Packet
	next    int
	// stash holds packets Recover read past while it waited for op 22,
	// copied, for Read to return first.
	stash []wire.Packet

	positions *Positions
}

// Options tune how a connection is made; the zero value is the defaults.
type Options struct {
	// Dialer sets the local address and socket options.
	Dialer *net.Dialer
	// TLS configures wss:// connections.
	TLS *tls.Config
	// Header is sent with the WebSocket upgrade (Origin, say).
	Header http.Header
	// Positions, when set, is where the connection keeps the last
	// position of each stream it receives: give the same Positions to
	// the next connection and Resume recovers what was missed between
	// them. Nil: the connection keeps its own.
	Positions *Positions
}

// Dial connects to target: a WebSocket URL (ws://host:port/sub,
// wss://…) or a TCP address (host:port, or tcp://host:port).
func Dial(ctx context.Context, target string, o Options) (*Conn, error) {
	nd := o.Dialer
	if nd == nil {
		nd = &net.Dialer{}
	}
	if strings.HasPrefix(target, "ws://") || strings.HasPrefix(target, "wss://") {
		d := *websocket.DefaultDialer
		d.NetDialContext = nd.DialContext
		d.TLSClientConfig = o.TLS
		ws, _, err := d.DialContext(ctx, target, o.Header)
		if err != nil {
			return nil, fmt.Errorf("dial %s: %w", target, err)
		}
		ws.SetReadLimit(maxBody)
		return &Conn{ws: ws, positions: positionsOr(o.Positions)}, nil
	}
	addr := strings.TrimPrefix(target, "tcp://")
	c, err := nd.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return &Conn{tcp: c, tcpRead: wire.NewReader(bufio.NewReader(c), maxBody), positions: positionsOr(o.Positions)}, nil
}

// Send sends one packet with the next sequence number and returns it.
func (c *Conn) Send(op int32, body []byte) (int32, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.seq++
	return c.seq, c.writeRaw(wire.Encode(op, c.seq, body))
}

// WriteRaw sends bytes as they are, for testing servers against bad input.
func (c *Conn) WriteRaw(b []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeRaw(b)
}

func (c *Conn) writeRaw(b []byte) error {
	if c.ws != nil {
		return c.ws.WriteMessage(websocket.BinaryMessage, b)
	}
	_, err := c.tcp.Write(b)
	return err
}

// Auth sends the auth packet and waits for op 8.
func (c *Conn) Auth(token []byte) (AuthReply, error) {
	if _, err := c.Send(wire.OpAuth, token); err != nil {
		return AuthReply{}, fmt.Errorf("send auth: %w", err)
	}
	p, err := c.Read()
	if err != nil {
		return AuthReply{}, fmt.Errorf("read auth reply: %w", err)
	}
	if p.Op != wire.OpAuthReply {
		return AuthReply{}, fmt.Errorf("auth answered with op %d", p.Op)
	}
	var r AuthReply
	if err := json.Unmarshal(p.Body, &r); err != nil {
		return AuthReply{}, fmt.Errorf("decode auth reply: %w", err)
	}
	for _, sp := range r.Streams {
		c.positions.seed(sp)
	}
	return r, nil
}

// Read returns the next packet; packets of an op 9 batch come one by one.
// The body is valid until the next Read: a load generator reading
// thousands of connections must not allocate per message.
func (c *Conn) Read() (wire.Packet, error) {
	if len(c.stash) > 0 {
		p := c.stash[0]
		c.stash = c.stash[1:]
		return p, nil
	}
	for c.next == len(c.pending) {
		if c.ws != nil {
			_, r, err := c.ws.NextReader()
			if err != nil {
				return wire.Packet{}, err
			}
			if c.frame, err = readAll(r, c.frame[:0]); err != nil {
				return wire.Packet{}, err
			}
		} else {
			p, err := c.tcpRead.Read()
			if err != nil {
				return wire.Packet{}, err
			}
			// Re-encoding lets one path flatten op 9 for both transports.
			c.frame = wire.Append(c.frame[:0], p.Op, p.Seq, p.Body)
		}
		var err error
		if c.pending, err = wire.AppendPackets(c.pending[:0], c.frame, maxBody); err != nil {
			return wire.Packet{}, err
		}
		c.next = 0
	}
	p := c.pending[c.next]
	c.next++
	return p, nil
}

// readAll reads r to its end into buf, growing it as needed.
func readAll(r io.Reader, buf []byte) ([]byte, error) {
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// SetReadDeadline bounds the next reads.
func (c *Conn) SetReadDeadline(t time.Time) error {
	if c.ws != nil {
		return c.ws.SetReadDeadline(t)
	}
	return c.tcp.SetReadDeadline(t)
}

// Close closes the connection.
func (c *Conn) Close() error {
	if c.ws != nil {
		return c.ws.Close()
	}
	return c.tcp.Close()
}

// CloseCode is the WebSocket close code err carries, or 0.
func CloseCode(err error) int {
	var ce *websocket.CloseError
	if errors.As(err, &ce) {
		return ce.Code
	}
	return 0
}
