package client

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"reflect"
	"testing"
	"time"

	"imcloud/proto/wire"
)

// fakeServer accepts one connection on 127.0.0.1 and runs script on it,
// speaking the wire format; the returned channel gives script's error.
func fakeServer(t *testing.T, script func(r *wire.Reader, c net.Conn) error) (string, <-chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		done <- script(wire.NewReader(c, wire.DefaultMaxBody), c)
	}()
	return ln.Addr().String(), done
}

func expectPacket(r *wire.Reader, op int32) (wire.Packet, error) {
	p, err := r.Read()
	if err != nil {
		return p, fmt.Errorf("read op %d: %w", op, err)
	}
	if p.Op != op {
		return p, fmt.Errorf("got op %d, want %d", p.Op, op)
	}
	return p, nil
}

func streamMsg(t *testing.T, stream, epoch string, pos uint64, body string) []byte {
	t.Helper()
	b, err := wire.AppendStreamMsg(nil, 0, stream, epoch, pos, 1000, []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func dial(t *testing.T, addr string, pos *Positions) *Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := Dial(ctx, addr, Options{Positions: pos})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	return c
}

// The whole opted-in session: op 8 seeds the positions, op 21 carries
// them, op 22 comes after a heartbeat reply (kept for Read), the missed
// messages come in an op 9 batch, then live ones, then an ack.
func TestRecoverSession(t *testing.T) {
	pos := NewPositions()
	pos.Set(wire.StreamPos{Stream: "room:live://1", Epoch: "ra", Pos: 10})
	pos.Set(wire.StreamPos{Stream: "room:old://1", Epoch: "ro", Pos: 3})
	wantReq := []wire.StreamPos{
		{Stream: "room:live://1", Epoch: "ra", Pos: 10},
		{Stream: "room:old://1", Epoch: "ro", Pos: 3},
		{Stream: "user:7", Epoch: "ua", Pos: 4},
	}
	addr, done := fakeServer(t, func(r *wire.Reader, c net.Conn) error {
		if _, err := expectPacket(r, wire.OpAuth); err != nil {
			return err
		}
		reply := `{"mid":7,"key":"k","rooms":["live://1"],"heartbeat":30,"recover":true,"acks":true,` +
			`"streams":[{"stream":"user:7","epoch":"ua","pos":4},{"stream":"room:live://1","epoch":"ra","pos":12}]}`
		if _, err := c.Write(wire.Encode(wire.OpAuthReply, 1, []byte(reply))); err != nil {
			return err
		}
		p, err := expectPacket(r, wire.OpRecover)
		if err != nil {
			return err
		}
		got, err := wire.DecodeRecoverRequest(p.Body)
		if err != nil {
			return err
		}
		if !reflect.DeepEqual(got, wantReq) {
			return fmt.Errorf("recover request %+v, want %+v", got, wantReq)
		}
		out := wire.Encode(wire.OpHeartbeatReply, 9, []byte{0, 0, 0, 1})
		body, err := wire.AppendRecoverReply(nil, []wire.RecoverResult{
			{Stream: "room:live://1", Recovered: true, Epoch: "ra", Pos: 12},
			{Stream: "room:old://1", Reason: wire.ReasonForbidden},
			{Stream: "user:7", Recovered: true, Epoch: "ua", Pos: 5},
		})
		if err != nil {
			return err
		}
		out = wire.Append(out, wire.OpRecoverReply, p.Seq, body)
		var batch []byte
		batch = append(batch, streamMsg(t, "room:live://1", "ra", 11, "r11")...)
		batch = append(batch, streamMsg(t, "user:7", "ua", 5, "u5")...)
		batch = append(batch, streamMsg(t, "room:live://1", "ra", 12, "r12")...)
		out = wire.Append(out, wire.OpRaw, 0, batch)
		out = append(out, streamMsg(t, "room:live://1", "ra", 13, "r13")...)
		out = wire.Append(out, 1001, 0, []byte("plain"))
		if _, err := c.Write(out); err != nil {
			return err
		}
		p, err = expectPacket(r, wire.OpAck)
		if err != nil {
			return err
		}
		epoch, ack, err := wire.DecodeAck(p.Body)
		if err != nil || epoch != "ua" || ack != 5 {
			return fmt.Errorf("ack %q %d, %v; want ua 5", epoch, ack, err)
		}
		return nil
	})
	c := dial(t, addr, pos)
	ar, err := c.Auth([]byte("token"))
	if err != nil {
		t.Fatal(err)
	}
	if !ar.Recover || !ar.Acks || len(ar.Streams) != 2 {
		t.Fatalf("auth reply %+v", ar)
	}
	if sp, _ := pos.Get("room:live://1"); sp.Pos != 10 {
		t.Fatalf("op 8 overwrote a known position: %+v", sp)
	}
	rr, err := c.Resume()
	if err != nil {
		t.Fatal(err)
	}
	if len(rr.Streams) != 3 || !rr.Streams[0].Recovered || rr.Streams[1].Reason != wire.ReasonForbidden {
		t.Fatalf("recover reply %+v", rr)
	}
	if _, ok := pos.Get("room:old://1"); ok {
		t.Fatal("a forbidden stream's position was kept")
	}
	want := []Message{
		{Op: wire.OpHeartbeatReply, Seq: 9, Body: []byte{0, 0, 0, 1}},
		{Op: 1000, Body: []byte("r11"), Stream: "room:live://1", Epoch: "ra", Pos: 11},
		{Op: 1000, Body: []byte("u5"), Stream: "user:7", Epoch: "ua", Pos: 5},
		{Op: 1000, Body: []byte("r12"), Stream: "room:live://1", Epoch: "ra", Pos: 12},
		{Op: 1000, Body: []byte("r13"), Stream: "room:live://1", Epoch: "ra", Pos: 13},
		{Op: 1001, Body: []byte("plain")},
	}
	for i, w := range want {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if !reflect.DeepEqual(m, w) {
			t.Fatalf("message %d = %+v, want %+v", i, m, w)
		}
	}
	if sp, _ := pos.Get("room:live://1"); sp != (wire.StreamPos{Stream: "room:live://1", Epoch: "ra", Pos: 13}) {
		t.Fatalf("room position %+v", sp)
	}
	if ok, err := c.AckUser(7); !ok || err != nil {
		t.Fatalf("AckUser = %v, %v", ok, err)
	}
	if err := <-done; err != nil {
		t.Fatalf("server: %v", err)
	}
}

// A stream not recovered moves to the server's epoch and position, and
// the next connection recovers from there.
func TestRecoverNotRecoveredMovesPosition(t *testing.T) {
	pos := NewPositions()
	pos.Set(wire.StreamPos{Stream: "user:7", Epoch: "old", Pos: 900})
	addr, done := fakeServer(t, func(r *wire.Reader, c net.Conn) error {
		p, err := expectPacket(r, wire.OpRecover)
		if err != nil {
			return err
		}
		body, err := wire.AppendRecoverReply(nil, []wire.RecoverResult{{Stream: "user:7", Reason: wire.ReasonEpoch, Epoch: "new", Pos: 3}})
		if err != nil {
			return err
		}
		_, err = c.Write(wire.Encode(wire.OpRecoverReply, p.Seq, body))
		return err
	})
	c := dial(t, addr, pos)
	rr, err := c.Resume()
	if err != nil || len(rr.Streams) != 1 || rr.Streams[0].Recovered || rr.Streams[0].Reason != wire.ReasonEpoch {
		t.Fatalf("Resume = %+v, %v", rr, err)
	}
	if sp, _ := pos.Get("user:7"); sp != (wire.StreamPos{Stream: "user:7", Epoch: "new", Pos: 3}) {
		t.Fatalf("position after epoch change %+v", sp)
	}
	if err := <-done; err != nil {
		t.Fatalf("server: %v", err)
	}
}

func TestReadMessageGapsAndDuplicates(t *testing.T) {
	frames := [][]byte{
		streamMsg(t, "user:7", "a", 1, ""),
		streamMsg(t, "user:7", "a", 2, ""),
		streamMsg(t, "user:7", "a", 2, ""), // duplicate
		streamMsg(t, "user:7", "a", 5, ""), // gap
		streamMsg(t, "user:7", "b", 1, ""), // epoch changed
		streamMsg(t, "user:7", "b", 2, ""),
	}
	want := []struct{ gap, dup bool }{{false, false}, {false, false}, {false, true}, {true, false}, {true, false}, {false, false}}
	addr, done := fakeServer(t, func(r *wire.Reader, c net.Conn) error {
		_, err := c.Write(bytes.Join(frames, nil))
		return err
	})
	c := dial(t, addr, nil)
	for i, w := range want {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		if m.Gap != w.gap || m.Dup != w.dup {
			t.Fatalf("message %d (%s %d): gap %v dup %v, want %v %v", i, m.Epoch, m.Pos, m.Gap, m.Dup, w.gap, w.dup)
		}
	}
	if sp, _ := c.Positions().Get("user:7"); sp.Epoch != "b" || sp.Pos != 2 {
		t.Fatalf("position %+v", sp)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestReadMessageRefusesMalformed(t *testing.T) {
	bad := wire.Encode(wire.OpStreamMsg, 0, []byte{200, 'x'})
	addr, done := fakeServer(t, func(r *wire.Reader, c net.Conn) error {
		_, err := c.Write(bad)
		return err
	})
	c := dial(t, addr, nil)
	if m, err := c.ReadMessage(); err == nil {
		t.Fatalf("malformed op 20 read as %+v", m)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A steady stream of positioned messages allocates nothing per message
// once its stream is known.
func TestObserveSteadyStreamAllocatesNothing(t *testing.T) {
	p := NewPositions()
	stream, epoch := []byte("room:live://1"), []byte("0123456789abcdef")
	p.observe(stream, epoch, 1)
	n := uint64(1)
	allocs := testing.AllocsPerRun(1000, func() {
		n++
		p.observe(stream, epoch, n)
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per message", allocs)
	}
}

func TestAuthReplyOfGoimClientUnchanged(t *testing.T) {
	// A connection that did not opt in gets goim's op 8; the client's
	// struct must not add members when it encodes one (the e2e tests
	// compare bodies).
	b, err := json.Marshal(AuthReply{Mid: 1, Key: "k", Rooms: []string{"live://1"}, Heartbeat: 30})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"mid":1,"key":"k","rooms":["live://1"],"heartbeat":30}`; string(b) != want {
		t.Fatalf("%s, want %s", b, want)
	}
}
