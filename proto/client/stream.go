package client

import (
	"bytes"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"

	"imcloud/proto/wire"
)

// maxStash bounds the packets Recover keeps while it waits for op 22; a
// server sends the reply before any positioned message, so only heartbeat
// replies and unpositioned messages can come first.
const maxStash = 4096

// Message is a packet as an application sees it. For op 20 (a positioned
// message) Op is the business operation and Stream, Epoch and Pos say
// where the message is; for any other packet Stream is empty. Body is
// valid until the next read.
type Message struct {
	Op   int32
	Seq  int32
	Body []byte

	Stream string
	Epoch  string
	Pos    uint64
	// Gap: the stream's epoch changed, or positions were skipped, since
	// the message before. In a room stream (and after an epoch change)
	// messages were lost, their history gone: the application resyncs
	// that stream. In a user stream a skipped position may also be a key
	// push to another of the user's connections, or a push that was
	// refused (void): the application checks with GET /im/history before
	// taking it for a loss.
	Gap bool
	// Dup: a position the connection had already received. A server
	// never sends one; the client reports rather than hides it.
	Dup bool
}

// ReadMessage reads the next packet (op 9 batches come one by one) and,
// for op 20, decodes it and records its position in the connection's
// Positions. A malformed op 20 is an error: the server broke the protocol.
func (c *Conn) ReadMessage() (Message, error) {
	p, err := c.Read()
	if err != nil {
		return Message{}, err
	}
	if p.Op != wire.OpStreamMsg {
		return Message{Op: p.Op, Seq: p.Seq, Body: p.Body}, nil
	}
	m, err := wire.DecodeStreamMsg(p.Body)
	if err != nil {
		return Message{}, fmt.Errorf("decode op 20: %w", err)
	}
	msg := Message{Op: m.Op, Seq: p.Seq, Body: m.Body, Pos: m.Pos}
	msg.Stream, msg.Epoch, msg.Gap, msg.Dup = c.positions.observe(m.Stream, m.Epoch, m.Pos)
	return msg, nil
}

// Recover sends op 21 with streams — normally the first packet after op 8
// — and waits for op 22. Packets that arrive first are kept for Read. The
// connection's Positions follow the reply: a recovered stream keeps the
// position sent (the missed messages follow); a stream not recovered
// moves to the reply's epoch and position (what came before is not sent:
// resync it), and a forbidden one is forgotten. Like Read, it is for the
// reading goroutine.
func (c *Conn) Recover(streams []wire.StreamPos) (wire.RecoverReply, error) {
	body, err := wire.AppendRecoverRequest(nil, streams)
	if err != nil {
		return wire.RecoverReply{}, err
	}
	seq, err := c.Send(wire.OpRecover, body)
	if err != nil {
		return wire.RecoverReply{}, fmt.Errorf("send recover request: %w", err)
	}
	var stash []wire.Packet
	for {
		p, err := c.Read()
		if err != nil {
			return wire.RecoverReply{}, fmt.Errorf("read recover reply: %w", err)
		}
		if p.Op != wire.OpRecoverReply {
			if len(stash) == maxStash {
				return wire.RecoverReply{}, fmt.Errorf("no recover reply within %d packets", maxStash)
			}
			p.Body = bytes.Clone(p.Body)
			stash = append(stash, p)
			continue
		}
		if p.Seq != seq {
			return wire.RecoverReply{}, fmt.Errorf("recover reply has seq %d, the request %d", p.Seq, seq)
		}
		r, err := wire.DecodeRecoverReply(p.Body)
		if err != nil {
			return r, err
		}
		c.stash = append(stash, c.stash...)
		for i, res := range r.Streams {
			switch {
			case res.Reason == wire.ReasonForbidden || res.Epoch == "":
				c.positions.Forget(res.Stream)
			case !res.Recovered:
				c.positions.Set(wire.StreamPos{Stream: res.Stream, Epoch: res.Epoch, Pos: res.Pos})
			case i < len(streams) && streams[i].Stream == res.Stream:
				c.positions.Set(streams[i])
			}
		}
		return r, nil
	}
}

// Resume recovers every stream in the connection's Positions: what a
// client sends right after op 8 when it reconnects.
func (c *Conn) Resume() (wire.RecoverReply, error) {
	return c.Recover(c.positions.All())
}

// Ack acknowledges the user stream up to pos (op 23): cumulative, so one
// ack covers every message of that epoch up to pos.
func (c *Conn) Ack(epoch string, pos uint64) error {
	var buf [1 + wire.MaxEpochLen + 8]byte
	if _, err := c.Send(wire.OpAck, wire.AppendAck(buf[:0], epoch, pos)); err != nil {
		return fmt.Errorf("send ack: %w", err)
	}
	return nil
}

// AckUser acknowledges the last position received of mid's user stream;
// false when there is none to acknowledge.
func (c *Conn) AckUser(mid int64) (bool, error) {
	sp, ok := c.positions.Get("user:" + strconv.FormatInt(mid, 10))
	if !ok || sp.Pos == 0 {
		return false, nil
	}
	return true, c.Ack(sp.Epoch, sp.Pos)
}

// Positions returns where the connection keeps its streams' positions.
func (c *Conn) Positions() *Positions { return c.positions }

// Positions is the last position received of each stream, safe for
// concurrent use; share one between a client's successive connections.
type Positions struct {
	mu sync.Mutex
	m  map[string]wire.StreamPos
}

// NewPositions returns an empty Positions.
func NewPositions() *Positions { return &Positions{m: make(map[string]wire.StreamPos)} }

func positionsOr(p *Positions) *Positions {
	if p != nil {
		return p
	}
	return NewPositions()
}

// All returns every stream's position, by stream name.
func (p *Positions) All() []wire.StreamPos {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]wire.StreamPos, 0, len(p.m))
	for _, sp := range p.m {
		if sp.Epoch != "" { // nothing to recover from; a request may not hold it
			out = append(out, sp)
		}
	}
	slices.SortFunc(out, func(a, b wire.StreamPos) int { return strings.Compare(a.Stream, b.Stream) })
	return out
}

// Get returns stream's position.
func (p *Positions) Get(stream string) (wire.StreamPos, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	sp, ok := p.m[stream]
	return sp, ok
}

// Set records sp, replacing what its stream had.
func (p *Positions) Set(sp wire.StreamPos) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.m[sp.Stream] = sp
}

// Forget drops stream: a resync, or a room left.
func (p *Positions) Forget(stream string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.m, stream)
}

// seed records sp unless its stream has a position already: op 8 tells
// where a stream starts, but one the client knew is for Recover.
func (p *Positions) seed(sp wire.StreamPos) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.m[sp.Stream]; !ok && sp.Epoch != "" {
		p.m[sp.Stream] = sp
	}
}

// observe records a received position and returns the stream and epoch as
// strings — the recorded ones when they match, so that a steady stream
// allocates nothing — and whether positions were lost or repeated.
func (p *Positions) observe(stream, epoch []byte, pos uint64) (string, string, bool, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	last, ok := p.m[string(stream)]
	if !ok || last.Epoch == "" {
		ok = false
		last = wire.StreamPos{Stream: string(stream)}
	}
	var gap, dup bool
	switch {
	case ok && last.Epoch == string(epoch):
		gap = pos > last.Pos+1
		dup = pos <= last.Pos
	case ok:
		gap = true // the stream's history was lost under us
		last.Epoch = string(epoch)
	default:
		last.Epoch = string(epoch)
	}
	if !dup {
		last.Pos = pos
		p.m[last.Stream] = last
	}
	return last.Stream, last.Epoch, gap, dup
}
